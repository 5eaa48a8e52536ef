"""The sweep file, validated with pydantic: unknown keys and unknown names are refused up front."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from quantbench.backends import backend_names, load_backend
from quantbench.config import QuantRunConfig, field_from
from quantbench.data import DATASETS, parse_spec
from quantbench.errors import UnknownNameError
from quantbench.models import get_entry
from quantbench.sweep.pareto import ParetoSection

DEFAULT = "default"
TRAIN = "train"
_BITS_RE = re.compile(r"^\s*W(\d+)\s*A(\d+)\s*$", re.IGNORECASE)


def known(lookup: Any, name: str) -> None:
    """Look ``name`` up in a registry; an unknown name becomes a ValueError pydantic reports with its location."""
    try:
        lookup(name)
    except UnknownNameError as exc:
        raise ValueError(str(exc)) from None


class Bits(BaseModel):
    """A weight/activation bit-width pair; ``W4A8`` or ``{w: 4, a: 8}``; ``default`` keeps the backend's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    w: int | None = Field(None, ge=1, le=16)
    a: int | None = Field(None, ge=1, le=16)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v.strip().lower() == DEFAULT:
                return {}
            m = _BITS_RE.match(v)
            if not m:
                raise ValueError(f"bits must look like 'W8A8' or 'default', got {v!r}")
            return {"w": int(m.group(1)), "a": int(m.group(2))}
        if isinstance(v, (list, tuple)) and len(v) == 2:
            return {"w": v[0], "a": v[1]}
        return v


class ModelEntry(BaseModel):
    """One model with its weights and dataset. Relative paths are relative to the sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    weights: str | None = Field(None, description="a weights file, 'train' (small models), or null (random init)")
    data: str = "digits"
    width_mult: float = Field(1.0, gt=0)

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        known(get_entry, v)
        return v

    @field_validator("data")
    @classmethod
    def _known_data(cls, v: str) -> str:
        known(DATASETS.get, parse_spec(v)[0])
        return v

    @model_validator(mode="after")
    def _trainable(self) -> ModelEntry:
        if self.weights == TRAIN and get_entry(self.model).family != "small":
            raise ValueError(f"weights: train is only for small models (e.g. digits_cnn); give a weights file for "
                             f"{self.model}")
        return self


class Settings(BaseModel):
    """Run settings shared by every method."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["cpu", "cuda"] = field_from(QuantRunConfig, "device")
    eval_batch_size: int = field_from(QuantRunConfig, "eval_batch_size")
    max_test: int | None = field_from(QuantRunConfig, "max_test")


FirstLastChoice = Literal["default", "same", "fp"] | int
PolicyChoice = Literal["default", "quantized", "fp"]


class SweepFile(BaseModel):
    """A sweep: the cartesian product of every list below is expanded into runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    plugins: list[str] = Field(default_factory=list, description="modules to import (extra method kinds)")
    models: list[ModelEntry] = Field(min_length=1)
    backends: list[str] | Literal["all"] = "all"
    methods: list[dict[str, Any]] = Field(min_length=1, description="{kind: ptq, ...} entries")
    bits: list[Bits] = Field(default_factory=lambda: [Bits()], min_length=1)
    first_last: list[FirstLastChoice] = Field(default_factory=lambda: [DEFAULT], min_length=1)
    residual: list[PolicyChoice] = Field(default_factory=lambda: [DEFAULT], min_length=1)
    skip: list[PolicyChoice] = Field(default_factory=lambda: [DEFAULT], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    settings: Settings = Field(default_factory=Settings)
    deploy: bool = Field(False, description="every run must target a deployable backend")
    pareto: ParetoSection | None = Field(None, description="precision fronts across widths and the DualPrecision "
                                                            "grid (seed 003; quantbench.sweep.pareto)")

    @field_validator("backends", mode="before")
    @classmethod
    def _all(cls, v: Any) -> Any:
        return "all" if v == ["all"] else v

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, v: Any) -> Any:
        if not v:  # every other axis refuses [] by min_length; the union with "all" needs it said here
            raise ValueError("List should have at least 1 item after validation, not 0 (list backends or say all)")
        if v != "all":
            for b in v:
                if not b.endswith((".yaml", ".yml")):
                    known(load_backend, b)
        return v

    @field_validator("first_last")
    @classmethod
    def _first_last_bits(cls, v: list[Any]) -> list[Any]:
        for item in v:
            if isinstance(item, int) and not 1 <= item <= 16:
                raise ValueError(f"first_last bits must be in 1..16, got {item}")
        return v

    def backend_list(self, resolve_path: Any = None) -> list[str]:
        """The backends to run (``all``: every built-in one); paths to .yaml specs are resolved."""
        if self.backends == "all":
            return backend_names()
        names = list(self.backends)
        if resolve_path is not None:
            names = [resolve_path(b) if b.endswith((".yaml", ".yml")) else b for b in names]
        for b in names:
            load_backend(b)
        return names
