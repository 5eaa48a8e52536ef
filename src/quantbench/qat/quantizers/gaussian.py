"""Gaussian-optimal clipped weights (seed 003 eq. 1, App. B) as a learning rule: every step filter ``i`` is
quantized with ``a_i = |W̄_i| / c_b`` (:mod:`quantbench.quant.gaussian_clip`), ``s_i = a_i / (2^(b-1) - 1)``, and the
gradient passes straight through (eq. 5, for all precisions). Codes lie in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with a
per-filter scale, so a baked layer exports as int8 per-channel codes and verifies like any other. The ``gaussian``
algorithm is seed 003's whole weight-quantizer family: a layer at 2 bits gets the ``ternary`` rule and one at 1 bit
the ``binary`` rule (:class:`Seed003Family`). Activations use LSQ (an interpretation: seed 003 quantizes activations
to 4 bits without naming their quantizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from quantbench.qat.quantizers.lsq import LSQQuantizer
from quantbench.qat.quantizers.ternary import BinaryWeight, TernaryOptions, TernaryWeight
from quantbench.quant.gaussian_clip import gaussian_clip_scale
from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm


class GaussianOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GaussianWeight(LearningRule):
    """``round(clamp(W_i, -a_i, a_i) / s_i) s_i`` with ``a_i = |W̄_i| / c_b`` per output filter (eq. 1)."""

    algorithm = "gaussian"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.bits = ctx.scheme.bits
        if self.bits < 3 or ctx.qmin >= 0:
            raise ValueError(f"{ctx.name}: Gaussian clipping needs signed weights of at least 3 bits, got "
                             f"{self.bits} bits [{ctx.qmin}, {ctx.qmax}]; use the ternary (2) or binary (1) rule")
        self.levels = 2 ** (self.bits - 1) - 1
        self.register_buffer("last_scale", torch.ones(ctx.channels))
        self.mark_initialized()  # nothing to initialise: the scale follows the weights

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        """The clipping follows the weights (|W̄_i| / c_b): a calibrator has nothing to set."""

    def init_from_tensor(self, x: Tensor) -> None:
        """The clipping follows the weights: nothing to initialise."""

    def quantize(self, x: Tensor) -> Tensor:
        s = gaussian_clip_scale(x, self.bits).clamp_min(torch.finfo(torch.float32).tiny).to(x.dtype)
        shaped = s.reshape(-1, *([1] * (x.dim() - 1)))
        codes = torch.clamp(torch.round(x.detach() / shaped), -self.levels, self.levels)
        with torch.no_grad():
            self.last_scale.copy_(s.float() if s.numel() == self.ctx.channels else s.float().mean().expand(
                self.ctx.channels))
        return (codes * shaped).detach() + (x - x.detach())  # exact forward value, identity gradient (eq. 5)

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        return self.last_scale.clone(), torch.zeros_like(self.last_scale)


@dataclass(frozen=True)
class Seed003Family(Algorithm):
    """Seed 003's weight quantizer by precision: Gaussian clipping above 2 bits, ternary at 2 (eq. 3), binary at 1
    (eq. 4), chosen per layer from its weight bits (a DualPrecision model mixes them)."""

    def build(self, ctx: QuantizerContext, options: BaseModel) -> LearningRule:
        if ctx.is_weight and ctx.scheme.bits <= 2:
            return (BinaryWeight if ctx.scheme.bits == 1 else TernaryWeight)(ctx, TernaryOptions())
        return super().build(ctx, options)


register_algorithm(Seed003Family(
    "gaussian", GaussianWeight, LSQQuantizer, GaussianOptions, per_channel_weights=True, pow2_scales=False,
    binary_weights=True,
    description="seed 003's weights per filter: Gaussian-optimal clipping above 2 bits (eq. 1 / App. B, a = |W̄| / "
                "c_b), ternary at 2 (eq. 3), binary at 1 (eq. 4), STE eq. 5; LSQ activations",
))
