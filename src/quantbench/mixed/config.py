"""The configuration of a learned mixed-precision allocation (seed 004 App. A/B defaults), validated up front."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from quantbench.config import QuantRunConfig


class MixedConfig(QuantRunConfig):
    """A mixed-precision run: the constraints, the allowed bit-widths, the protocol and the calibrators.

    Defaults are seed 004's (App. B; the authors' scripts): min/max calibration, 1024 labelled training images,
    1500 steps of batch 32, Adam lr 0.01, lambda 2.0, the best-EMA-accuracy step that meets the constraints.
    """

    w_observer: str = "minmax"
    a_observer: str = "minmax"
    w_avg: float | None = Field(None, description="average weight bits (weighted by parameters)")
    a_avg: float | None = Field(None, description="average activation bits (weighted by elements per image)")
    a_max_fmap: float | None = Field(None, gt=0, description="largest feature map in bytes (one image)")
    fmap_mode: Literal["analytic", "learned"] = Field(
        "analytic", description="max-feature-map budget: analytic allocation (Obs. 6) or learned with a hinge")
    allowed: list[int] | None = Field(None, description="allowed bit-widths, e.g. [2, 4, 8] (None: every integer "
                                                        "from min_bits to max_bits)")
    min_bits: int = Field(2, ge=1, le=16)
    max_bits: int = Field(8, ge=1, le=16, description="the backend's largest supported bit-width")
    first_last_budget: Literal["in", "out"] = Field(
        "in", description="in: the first and last layer are allocated and counted; out: they stay at 8 bits and "
                          "the averages are over the rest (seed 004 Obs. 4, Table 2)")
    labels: Literal["true", "pseudo"] = Field("true", description="true labels, or the float model's argmax")
    images: int = Field(1024, ge=1, description="labelled training images the allocation learns on")
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    lam: float = Field(2.0, ge=0, description="weight of the constraint hinge (lambda_1 = lambda_2)")
    ema: float = Field(0.9, ge=0, lt=1, description="EMA factor of the training accuracy used for model selection")
    init_bits: float | None = Field(None, gt=0, description="starting bit-width (default: max_bits)")
    estimator: Literal["ste", "dither"] = Field(
        "ste", description="gradient of the loss to the bit-widths: ste (rounding with a straight-through gradient, "
                           "the paper's) or dither (uniform noise of one step during the search)")
    baselines: bool = Field(True, description="also evaluate uniform precision and the sensitivity greedy")
    sensitivity_images: int = Field(256, ge=1, description="images the greedy baseline's sensitivities use")

    @field_validator("allowed")
    @classmethod
    def _allowed(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v or any(not 1 <= b <= 16 for b in v):
            raise ValueError(f"allowed bit-widths must be in 1..16, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _constraints(self) -> MixedConfig:
        if self.w_avg is None and self.a_avg is None and self.a_max_fmap is None:
            raise ValueError("give a constraint: w_avg (--w-avg), a_avg (--a-avg) or a_max_fmap (--a-max-fmap)")
        if self.fmap_mode == "learned" and self.a_max_fmap is None:
            raise ValueError("fmap_mode learned needs a feature-map budget: give a_max_fmap (--a-max-fmap BYTES)")
        if self.a_avg is not None and self.a_max_fmap is not None:
            raise ValueError("a_avg and a_max_fmap are two kinds of activation constraint: give one")
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits {self.min_bits} > max_bits {self.max_bits}")
        lo, hi = self.bit_set()[0], self.bit_set()[-1]
        for what, t in (("w_avg", self.w_avg), ("a_avg", self.a_avg)):
            if t is not None and not lo <= t <= hi:
                raise ValueError(f"{what} {t} is outside the allowed bit-widths {lo}..{hi}")
        if self.calib_data != "real":
            raise ValueError("mixed precision learns on labelled real images: calib_data must be real")
        return self

    def bit_set(self) -> list[int]:
        """The allowed bit-widths (ascending)."""
        return list(self.allowed) if self.allowed else list(range(self.min_bits, self.max_bits + 1))

    @property
    def learns_weights(self) -> bool:
        return self.w_avg is not None

    @property
    def learns_activations(self) -> bool:
        return self.a_avg is not None or (self.a_max_fmap is not None and self.fmap_mode == "learned")
