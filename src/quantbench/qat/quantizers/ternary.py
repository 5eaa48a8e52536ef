"""Ternary (seed 003 eq. 3) and binary (seed 003 eq. 4) weights per output filter, as learning rules.

Both scale filter ``i`` by ``|W̄_i|``, the mean absolute value of its weights (eq. 2), and pass the gradient
straight through (eq. 5). Their output lies on the integer grid ``{-1, 0, 1} · |W̄_i|`` (binary: ``{-1, 1}``), so a
baked layer exports as int8 per-channel codes with scale ``|W̄_i|`` and verifies like any other. Activations use
LSQ (an interpretation: seed 003 quantizes activations to 4 bits without naming their quantizer).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantbench.qat.quantizers.lsq import LSQQuantizer
from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm


def mean_abs_per_filter(w: Tensor) -> Tensor:
    """``|W̄_i|`` of eq. 2: the mean absolute value of each output filter, shaped to broadcast over ``w``."""
    return w.detach().abs().reshape(w.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def _ste(w: Tensor, wq: Tensor) -> Tensor:
    """Forward value exactly ``wq``, gradient identity w.r.t. ``w`` (eq. 5).

    ``wq + (w - w.detach())`` adds an exact zero; the common ``w + (wq - w).detach()`` rounds twice and returns
    values an ulp off ``wq``, so a filter would show more than 2 / 3 distinct values.
    """
    return wq.detach() + (w - w.detach())


def ternary_quantize(w: Tensor, threshold: float = 0.7) -> Tensor:
    """Eq. 3: ``sign(W) * M * |W̄|`` with ``M = 0`` where ``|W_ij| < threshold |W̄_i|``."""
    m = mean_abs_per_filter(w)
    keep = (w.detach().abs() >= threshold * m).to(w.dtype)
    return _ste(w, torch.sign(w.detach()) * keep * m)


def binary_quantize(w: Tensor) -> Tensor:
    """Eq. 4: ``sign(W) * |W̄|``; zero weights map to ``+|W̄|`` so every value is binary."""
    m = mean_abs_per_filter(w)
    sign = torch.where(w.detach() >= 0, 1.0, -1.0).to(w.dtype)
    return _ste(w, sign * m)


class TernaryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(0.7, gt=0, lt=1, description="zero weights below threshold * |W̄_i| (eq. 3)")


class TernaryWeight(LearningRule):
    """``sign(W) · 1[|W| ≥ 0.7 |W̄_i|] · |W̄_i|`` per output filter; ``binary`` drops the threshold (eq. 4)."""

    algorithm = "ternary"
    binary = False

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        if ctx.qmin > -1 or (ctx.qmax < 1 and not self.binary):
            raise ValueError(f"{ctx.name}: {self.algorithm} codes need a signed weight range, got "
                             f"[{ctx.qmin}, {ctx.qmax}]")
        self.register_buffer("last_scale", torch.ones(ctx.channels))
        self.mark_initialized()  # nothing to initialise: the scale follows the weights

    @property
    def qmin(self) -> int:
        """Codes lie in {-1, 0, 1} (binary: {-1, 1}, also at 1 bit), the grid a baked or exported layer keeps."""
        return -1

    @property
    def qmax(self) -> int:
        return 1

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        """The scale follows the weights (|W̄_i|): a calibrator has nothing to set."""

    def init_from_tensor(self, x: Tensor) -> None:
        """The scale follows the weights (|W̄_i|): nothing to initialise."""

    def quantize(self, x: Tensor) -> Tensor:
        y = binary_quantize(x) if self.binary else ternary_quantize(x, getattr(self.options, "threshold", 0.7))
        with torch.no_grad():
            m = mean_abs_per_filter(x).reshape(-1)
            self.last_scale.copy_(m.clamp_min(torch.finfo(torch.float32).tiny).expand(self.ctx.channels)
                                  if m.numel() == self.ctx.channels else m.mean().expand(self.ctx.channels))
        return y

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        return self.last_scale.clone(), torch.zeros_like(self.last_scale)


class BinaryWeight(TernaryWeight):
    algorithm = "binary"
    binary = True


class BinaryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


register_algorithm(Algorithm(
    "ternary", TernaryWeight, LSQQuantizer, TernaryOptions, per_channel_weights=True, pow2_scales=False,
    description="ternary weights per filter (seed 003 eq. 3, threshold 0.7 |W̄|, STE eq. 5); LSQ activations",
))
register_algorithm(Algorithm(
    "binary", BinaryWeight, LSQQuantizer, BinaryOptions, per_channel_weights=True, pow2_scales=False,
    binary_weights=True,
    description="binary weights per filter (seed 003 eq. 4, STE eq. 5); LSQ activations",
))
