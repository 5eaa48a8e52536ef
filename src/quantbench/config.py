"""Validated run configurations. Every field is checked before any work starts.

This is the one place defaults live: the sweep's method parameters and settings and the CLI options
take their defaults and constraints from these fields (:func:`field_from`, :func:`default_of`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from quantbench.backends import load_backend
from quantbench.backends.overrides import LayerOverride
from quantbench.backends.spec import BackendSpec
from quantbench.errors import ConfigError
from quantbench.models import get_entry
from quantbench.observers import OBSERVERS, validate_observer_options
from quantbench.recon.config import RECON_METHODS, ReconOptions

Policy = Literal["quantized", "fp"]


class QuantRunConfig(BaseModel):
    """What every quantization run shares: the model, data, backend and its overrides, the calibrators, the
    device. Names are checked against their registries, so a typo fails before any work starts."""

    model_config = ConfigDict(extra="forbid")

    model: str
    weights: str | None = None
    data: str = "digits"
    backend: str = "academic"
    w_bits: int | None = Field(None, ge=1, le=16, description="override the backend's weight bits")
    a_bits: int | None = Field(None, ge=1, le=16, description="override the backend's activation bits")
    w_observer: str | None = None
    a_observer: str | None = None
    w_observer_options: dict[str, Any] = Field(default_factory=dict)
    a_observer_options: dict[str, Any] = Field(default_factory=dict)
    calib_size: int = Field(256, ge=1)
    calib_batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    first_last: Literal["same", "fp"] | int | None = Field(None, description="None: the backend's default")
    residual: Policy | None = None
    skip: Policy | None = None
    width_mult: float = Field(1.0, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = 0
    max_test: int | None = Field(None, ge=1, description="evaluate on the first N test images only")
    overrides: list[LayerOverride] = Field(
        default_factory=list, description="per-layer overrides after the backend's own (later entries win)")
    calib_data: str = Field("real", description=(
        "images for calibration, BN re-calibration and reconstruction: real (the dataset's training split), "
        "noise[:N] or synthetic:GENERATOR[:N] (made from the float model's BN statistics, quantbench.datafree)"))
    synthetic_options: dict[str, Any] = Field(default_factory=dict, description="the generator's options")

    @field_validator("w_observer", "a_observer")
    @classmethod
    def _observer_known(cls, v: str | None) -> str | None:
        if v is not None:
            OBSERVERS.get(v)  # raises UnknownNameError listing the valid names
        return v

    @model_validator(mode="after")
    def _data_source_valid(self) -> QuantRunConfig:
        from quantbench.datafree.generators import GENERATORS
        from quantbench.datafree.source import parse_data_source

        src = parse_data_source(self.calib_data)  # ConfigError naming the valid forms
        if self.synthetic_options:
            if src.kind == "real":
                raise ValueError("synthetic_options given but calib_data is real: set calib_data to "
                                 "synthetic:GENERATOR or noise")
            GENERATORS.get(src.generator or "noise").options_type.model_validate(self.synthetic_options)
        return self

    @field_validator("model")
    @classmethod
    def _model_known(cls, v: str) -> str:
        get_entry(v)
        return v

    @field_validator("backend")
    @classmethod
    def _backend_known(cls, v: str) -> str:
        load_backend(v)
        return v

    @field_validator("first_last")
    @classmethod
    def _first_last_bits(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 16:
            raise ValueError(f"first_last bits must be in 1..16, got {v}")
        return v

    def observers(self) -> tuple[str | None, str | None]:
        """The weight and activation calibrators this run uses (QAT fills unset ones from its algorithm)."""
        return self.w_observer, self.a_observer

    @model_validator(mode="after")
    def _observer_options_valid(self) -> QuantRunConfig:
        """Each observer's options against its declared ones, so a bad option fails here, not at calibration."""
        w_obs, a_obs = self.observers()
        for role, obs, opts in (("w", w_obs, self.w_observer_options), ("a", a_obs, self.a_observer_options)):
            if obs is not None:
                try:
                    validate_observer_options(obs, opts)
                except ValueError as exc:  # ObserverOptionError; pydantic reports it as a validation error
                    raise ValueError(f"{role}_observer_options: {exc}") from None
        return self

    @model_validator(mode="after")
    def _device_available(self) -> QuantRunConfig:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available: use --device cpu")
        return self

    def binary_weights(self) -> bool:
        """Whether 1-bit weights mean the binary grid {-1, +1}·s (a QAT rule that learns it; never in PTQ)."""
        return False

    def resolved_backend(self) -> BackendSpec:
        """The backend spec with this run's bit-width and policy overrides applied."""
        try:
            return load_backend(self.backend).configure(
                w_bits=self.w_bits, a_bits=self.a_bits, first_last=self.first_last,
                residual=self.residual, skip=self.skip, overrides=self.overrides,
                binary_weights=self.binary_weights() or None,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


class PTQConfig(QuantRunConfig):
    """Everything a post-training quantization run needs."""

    w_observer: str = "mse"
    a_observer: str = "mse"
    bn_calib: bool = False
    bn_calib_size: int | None = Field(None, ge=1, description="images for BN re-calibration (default: calib_size)")
    bn_calib_augment: bool = Field(True, description=(
        "BN re-calibration on real training images under the training augmentation (random crop / flip), the "
        "distribution the BN statistics were trained on; false: the un-augmented images (noise and synthetic sets "
        "are used as they are)"))
    method: str = Field("nearest", description="'nearest' (calibration only) or a reconstruction method: "
                                               "adaround, brecq, qdrop (quantbench.recon)")
    recon: ReconOptions = Field(default_factory=ReconOptions, description="reconstruction options")

    @field_validator("method")
    @classmethod
    def _method_known(cls, v: str) -> str:
        if v != "nearest":
            RECON_METHODS.get(v)  # raises UnknownNameError listing the valid names
        return v


def field_from(model: type[BaseModel], name: str) -> Any:
    """A copy of ``model``'s field ``name`` (default, constraints, description) to declare the same field
    in another model: ``calib_size: int = field_from(PTQConfig, "calib_size")``."""
    return FieldInfo.merge_field_infos(model.model_fields[name])


def default_of(model: type[BaseModel], name: str) -> Any:
    """The default of ``model``'s field ``name`` (for CLI option defaults)."""
    return model.model_fields[name].get_default(call_default_factory=True)
