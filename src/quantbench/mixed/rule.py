"""The learning rule of learned mixed precision: a quantizer whose bit-width is a parameter.

``log_bits`` holds ``log2(b)`` (the authors' parameterisation, so ``b`` stays positive); the forward rounds
``b = 2^log_bits`` to the nearest allowed bit-width (straight-through) and quantizes on that grid:

* weights: the grid the calibrator gives at each allowed bit-width (computed once, :meth:`set_weight_grids`),
  so "weight ranges follow the calibrator"; the scale carries the gradient of ``range / (2^b - 1)`` to ``b``;
* activations: a learned clipping range ``[lo, hi]`` (per tensor, started from the calibration), the scale
  and zero-point recomputed from it at the rounded bit-width every step (seed 004 App. A).

Fake quantization rounds ``x * (1/s)`` like torch's kernels (so a rule at bit-width ``b`` computes exactly what the
static quantizer calibrated at ``b`` computes) with LSQ's straight-through gradients, so the cross-entropy reaches
``b`` through the scale and the range through scale and zero-point.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from quantbench.quant.bitwidth import qrange_at, rescale, round_to_allowed
from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext
from quantbench.quant.ste import pow2_ste, round_ste


def _fake_quant(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x * (1/s)) + z, N_min, N_max) - z) * s``, the round passed straight through: ``dx`` is 1 inside
    the range, ``ds`` is ``round(x/s) - x/s`` inside and ``N - z`` outside, ``dz`` is ``-s`` outside (LSQ / LSQ+)."""
    q = torch.clamp(round_ste(x * torch.reciprocal(s)) + z, qmin, qmax)
    return (q - z) * s


def _dithered(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(clamp(x/s + z + u, N_min, N_max) - z) * s`` with ``u ~ U(-1/2, 1/2)``: quantization replaced by noise of
    the same step, fresh every call, so ``d/ds`` is the noise itself and its correlation with the loss gradient
    measures how much the loss grows with the step (the rounding error of fixed weights is the same every step, so
    the straight-through estimate keeps a bias that this one averages out)."""
    u = torch.rand_like(x) - 0.5
    return (torch.clamp(x / s + z + u, qmin, qmax) - z) * s


class BitWidthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BitWidthRule(LearningRule):
    """A quantizer with a learned bit-width (and, for activations, a learned clipping range)."""

    algorithm = "bitwidth"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.log_bits = nn.Parameter(torch.tensor(math.log2(ctx.scheme.bits)))
        self.register_buffer("allowed", torch.tensor([float(ctx.scheme.bits)]))
        self.signed = ctx.qmin < 0
        self.narrow = bool(ctx.scheme.narrow_range and self.signed)
        # weights: the calibrator's scale / zero-point at each allowed bit-width (K, C)
        self.register_buffer("scale_table", torch.ones(1, ctx.channels))
        self.register_buffer("zp_table", torch.zeros(1, ctx.channels))
        # activations: the learned clipping range
        self.lo = nn.Parameter(torch.zeros(()))
        self.hi = nn.Parameter(torch.ones(()))
        #: while gradients are on, add uniform noise of one step instead of rounding (``estimator: dither``)
        self.dither = False
        self.mark_initialized()

    # ------------------------------------------------------------------ set-up
    def set_allowed(self, allowed: list[int], start: float) -> None:
        """The bit-widths the rule may take (ascending) and the bit-width it starts from."""
        self.allowed = torch.tensor(sorted(float(b) for b in allowed), device=self.log_bits.device)
        self.set_bits(start)

    @torch.no_grad()
    def set_bits(self, bits: float) -> None:
        self.log_bits.fill_(math.log2(bits))

    @torch.no_grad()
    def set_weight_grids(self, scales: Tensor, zero_points: Tensor) -> None:
        """``(K, C)`` scales and zero-points of the calibrator at each allowed bit-width (K = len(allowed))."""
        self.scale_table = scales.detach().float().to(self.log_bits.device)
        self.zp_table = zero_points.detach().float().to(self.log_bits.device)

    @torch.no_grad()
    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        self.lo.fill_(float(lo.min()))
        self.hi.fill_(float(hi.max()))

    def init_from_tensor(self, x: Tensor) -> None:  # pragma: no cover - always initialised from calibration
        raise NotImplementedError("the bit-width rule starts from a calibrated quantizer")

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep ``b`` within half a step of the allowed set (so the gradient keeps acting) and ``lo <= 0 <= hi``."""
        lo, hi = float(self.allowed[0]) - 0.49, float(self.allowed[-1]) + 0.49
        self.log_bits.clamp_(math.log2(max(lo, 0.51)), math.log2(hi))
        self.lo.clamp_(max=0.0)
        self.hi.clamp_(min=1e-6)

    # ------------------------------------------------------------------ forward
    def bits(self) -> Tensor:
        """The rounded bit-width (a float tensor, straight-through to ``log_bits``)."""
        return round_to_allowed(torch.exp2(self.log_bits), self.allowed)

    def rounded_bits(self) -> int:
        return int(self.bits().detach())

    def quantize(self, x: Tensor) -> Tensor:
        b = self.bits()
        nb = int(b.detach())
        qmin, qmax = qrange_at(nb, self.signed, self.narrow)
        s, z = self._grid(b, nb, qmin, qmax)
        if self.pow2:
            s = pow2_ste(s)
        if self.dither and torch.is_grad_enabled():
            return _dithered(x, self.shaped(s, x), self.shaped(z, x), qmin, qmax)
        return _fake_quant(x, self.shaped(s, x), self.shaped(z, x), qmin, qmax)

    def _grid(self, b: Tensor, nb: int, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
        if self.is_weight:
            k = int((self.allowed == nb).nonzero()[0])
            return rescale(self.scale_table[k], b, self.narrow), self.zp_table[k]
        steps = torch.exp2(b) - (2.0 if self.narrow else 1.0)
        if self.ctx.scheme.symmetric:
            top = torch.maximum(-self.lo, self.hi) if self.signed else self.hi
            s = top / (steps / 2 if self.signed else steps)
            return s.clamp_min(1e-8), torch.zeros_like(s)
        s = ((self.hi - self.lo) / steps).clamp_min(1e-8)
        z = torch.clamp(qmin - round_ste(self.lo / s), qmin, qmax)
        return s, z

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            b = self.bits()
            nb = int(b)
            s, z = self._grid(b, nb, *qrange_at(nb, self.signed, self.narrow))
            return s.reshape(-1), z.reshape(-1)

    def describe(self) -> dict:
        return {**super().describe(), "bits": self.rounded_bits()}


BITWIDTH = Algorithm("bitwidth", BitWidthRule, BitWidthRule, BitWidthOptions,
                     description="learned bit-width (seed 004 App. A); mixed-precision allocation only")
