"""The QAT run configuration: a validated model loaded from YAML, overridden by flags, saved with the run."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from quantbench.config import QuantRunConfig
from quantbench.errors import ConfigError
from quantbench.qat.prepare import check_compatible
from quantbench.qat.quantizers import ALGORITHMS
from quantbench.qat.recipe import recipe_defaults

#: fields that change what is logged or evaluated but not the trained weights (ignored when resuming)
NON_RESULT_FIELDS = frozenset({"out_dir", "eval_batch_size", "max_test", "log_every", "eval_every", "on_divergence"})
#: where runs without an ``out_dir`` go (one sub-folder per run identity)
DEFAULT_OUT_ROOT = Path("qat-out")


class QATConfig(QuantRunConfig):
    """Everything a QAT run needs. Unset recipe values (``lr``, ``weight_decay``...) come from the model
    family (seed 001 A); see :meth:`resolved`. Calibrators left unset are the algorithm's defaults."""

    # the algorithm and its initialisation (seed 001 C.4: a PTQ calibrator initialises QAT)
    algorithm: str = "lsq"
    algorithm_options: dict[str, Any] = Field(default_factory=dict)
    init: Literal["calibrator", "paper"] = "calibrator"
    bn_fold: int = Field(3, ge=0, le=4, description="BN folding strategy 0..4 (backends that fold BN)")
    bn_freeze_step: int | None = Field(None, ge=0, description="freeze BN statistics after this many steps")
    bn_init: bool = Field(False, description="re-estimate BN statistics on the calibration images once the "
                                             "quantizers are set, before training (seed 001 C.3): DoReFa's weight "
                                             "normalisation rescales a pretrained layer's output (ResNet-20, "
                                             "academic W8A8 PACT: 42.8 % -> 88.2 % on 500 test images)")
    # the recipe
    epochs: int = Field(3, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, description="global batch size (split over DDP processes)")
    lr: float | None = Field(None, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float | None = Field(None, ge=0, le=1)
    quantizer_lr: float | None = Field(None, gt=0, le=10, description="default: lr")
    quantizer_weight_decay: float | None = Field(None, ge=0, le=1, description="default: weight_decay")
    warmup_steps: int = Field(0, ge=0)
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up over this many epochs (after warmup_steps)")
    schedule: Literal["cosine", "multistep"] = Field("cosine", description="learning-rate decay after the warm-up")
    milestones: list[int] = Field(default_factory=list, description="multistep: epochs at which lr is multiplied "
                                                                    "by gamma (seed 002 Table 2: 150, 225, 270)")
    gamma: float = Field(0.1, gt=0, le=1, description="multistep: the factor at each milestone")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: bool = True
    max_train: int | None = Field(None, ge=1, description="train on the first N training images")
    # running and reporting
    amp: Literal["none", "bf16"] = "none"
    fused_kernels: bool = Field(False, description="torch.compile-fused LSQ fake quantization (C++ on CPU, "
                                                   "Triton on CUDA); compiles once per process")
    log_every: int = Field(50, ge=1, description="K: train accuracy every K iterations (EMA, momentum 0.3)")
    eval_every: int | None = Field(None, ge=1, description="test accuracy every K iterations (default log_every)")
    on_divergence: Literal["warn", "stop"] = Field(
        "warn", description="a finite loss that diverges: warn, or stop as on a NaN loss (keeping the last good "
                            "checkpoint)")
    out_dir: str | None = Field(None, description="run folder; default qat-out/<run name> (see run_dir)")

    @field_validator("algorithm")
    @classmethod
    def _algorithm_known(cls, v: str) -> str:
        ALGORITHMS.get(v)
        return v

    @field_validator("algorithm_options")
    @classmethod
    def _options_valid(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("algorithm")
        if name is None:
            return v
        try:
            ALGORITHMS.get(name).parse_options(v)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                                 for e in exc.errors())
            raise ValueError(f"{name} options: {problems}") from None
        return v

    def binary_weights(self) -> bool:
        """1-bit weights are binary when the algorithm's weight rule makes them so (binary, gaussian)."""
        return ALGORITHMS.get(self.algorithm).binary_weights

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v) or v != sorted(set(v)):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {v}")
        return v

    def check(self) -> QATConfig:
        """Cross-checks that need the backend: the algorithm and BN strategy must suit it (ConfigError)."""
        check_compatible(self.algorithm, self.resolved_backend(), self.bn_fold)
        return self

    # ------------------------------------------------------------------------------------ resolution
    def observers(self) -> tuple[str, str]:
        w, a = ALGORITHMS.get(self.algorithm).default_observers
        return self.w_observer or w, self.a_observer or a

    def resolved(self) -> dict[str, Any]:
        """The recipe values actually used (family defaults filled in)."""
        d = recipe_defaults(self.model) if self.lr is None or self.weight_decay is None else None
        lr = self.lr if self.lr is not None else d.lr  # type: ignore[union-attr]
        wd = self.weight_decay if self.weight_decay is not None else d.weight_decay  # type: ignore[union-attr]
        w_obs, a_obs = self.observers()
        return {"lr": lr, "weight_decay": wd, "quantizer_lr": self.quantizer_lr or lr,
                "quantizer_weight_decay": wd if self.quantizer_weight_decay is None else self.quantizer_weight_decay,
                "w_observer": w_obs, "a_observer": a_obs, "eval_every": self.eval_every or self.log_every}

    def identity(self) -> dict[str, Any]:
        """The fields that decide the trained weights (compared when resuming)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in NON_RESULT_FIELDS}

    def run_name(self) -> str:
        """``<model>-<backend>-<algorithm>-w<bits>a<bits>-<hash>``: unique per run identity (the hash covers
        every field of :meth:`identity`), so two different runs never share a default folder."""
        spec = self.resolved_backend()
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        backend = Path(self.backend).stem if self.backend.endswith((".yaml", ".yml")) else self.backend
        name = (f"{self.model}-{backend}-{self.algorithm.replace('+', 'plus')}-w{spec.weight.bits}"
                f"a{spec.activation.bits}-{digest}")
        return re.sub(r"[^\w.-]", "_", name)

    def run_dir(self) -> Path:
        """The run folder: ``out_dir`` if given, else ``qat-out/<run name>`` (:meth:`run_name`)."""
        return Path(self.out_dir) if self.out_dir is not None else DEFAULT_OUT_ROOT / self.run_name()

    def to_yaml(self) -> str:
        resolved = {**self.resolved(), "out_dir": str(self.run_dir())}
        return yaml.safe_dump({**self.model_dump(mode="json"), "resolved": resolved}, sort_keys=False)


def load_qat_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                    cls: type[QATConfig] = QATConfig) -> QATConfig:
    """Read a YAML run file (optional) and apply ``overrides`` (flags; None values are ignored).

    Relative ``weights`` and ``data`` paths in the file are relative to the file (as in sweep files); flags
    and ``out_dir`` are relative to the working directory.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"QAT config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of QAT settings (model: ..., epochs: ...), got "
                              f"{type(loaded).__name__}")
        loaded.pop("resolved", None)  # a config saved with a run can be fed back
        data.update(_relative_to(loaded, p.parent))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if "model" not in data:
        raise ConfigError("no model given: pass --model or put 'model:' in the --config YAML")
    return cls.model_validate(data).check()


def _relative_to(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``weights`` and the path of ``data`` given relative in a YAML file are relative to that file's folder."""
    out = dict(data)
    if isinstance(out.get("weights"), str) and not Path(out["weights"]).is_absolute():
        out["weights"] = str(folder / out["weights"])
    if isinstance(out.get("data"), str) and ":" in out["data"]:
        kind, path = out["data"].split(":", 1)
        if path and not Path(path).expanduser().is_absolute():
            out["data"] = f"{kind}:{folder / path}"
    return out


def config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Lines ``field: checkpoint value -> this run's value`` for every field that differs."""
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k)!r} (checkpoint) vs {now.get(k)!r} (now)" for k in keys if saved.get(k) != now.get(k)]
