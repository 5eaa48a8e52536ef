"""DSQ: differentiable soft quantization (Gong et al. 2019; seed 001 F eq. 12-13)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm
from quantbench.quant.qparams import range_qparams
from quantbench.quant.ste import per_channel_rows


class DSQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(0.4, gt=0, lt=1, description="tanh shape: 1 - tanh(k Δ / 2); smaller is closer to a step")
    sigmas: float = Field(2.6, gt=0, description="weight clipping range mean ± sigmas * std")
    momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the activation BatchMinMax range")


def dsq_round(v: Tensor, alpha: float) -> Tensor:
    """``round(v)`` in the forward pass; backward: the derivative of DSQ's soft step
    ``floor(v) + (1 + tanh(k (v - floor(v) - 1/2)) / (1 - α)) / 2`` with ``k = 2 atanh(1 - α)`` (unit Δ)."""
    k = 2.0 * math.atanh(1.0 - alpha)
    fl = torch.floor(v).detach()
    soft = fl + 0.5 * torch.tanh(k * (v - fl - 0.5)) / (1.0 - alpha) + 0.5
    return soft + (torch.round(v) - soft).detach()


class _DSQBase(LearningRule):
    """``x_hat = (dsq_round(clamp(x / s + z, N_min, N_max)) - z) * s`` with ``s, z`` from a clipping range
    that is observed, not learned (symmetric ``s = max(-lo, hi) / ((N_max - N_min) / 2)``, asymmetric
    ``s = (hi - lo) / (N_max - N_min)``, ``z = N_min - floor(lo / s)``). The symmetric divisor is half the
    integer range, as in the calibrators; seed 001 F prints ``N_max - N_min``, which would leave half the
    codes unused."""

    algorithm = "dsq"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.opts = options if isinstance(options, DSQOptions) else DSQOptions()
        self.register_buffer("lo", torch.zeros(ctx.channels))
        self.register_buffer("hi", torch.ones(ctx.channels))

    def qparams(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return range_qparams(lo, hi, self.qmin, self.qmax, self.ctx.scheme.symmetric, floor_zero_point=True,
                             pow2=self.pow2)

    def fake_quant(self, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        s, z = self.qparams(lo.to(x.dtype), hi.to(x.dtype))
        s, z = self.shaped(s, x), self.shaped(z, x)
        v = torch.clamp(x / s + z, self.qmin, self.qmax)
        return (dsq_round(v, self.opts.alpha) - z) * s

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        return self.qparams(self.lo, self.hi)

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        self.lo.copy_(lo.expand_as(self.lo))
        self.hi.copy_(hi.expand_as(self.hi))


class DSQWeight(_DSQBase):
    """Weights: the range ``μ(w) ± 2.6 σ(w)`` (eq. 12-13; per output channel for per-channel schemes),
    recomputed from the current weights at every forward."""

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.mark_initialized()

    def init_from_tensor(self, x: Tensor) -> None:
        """The range follows the weights at every step."""

    def quantize(self, x: Tensor) -> Tensor:
        rows = per_channel_rows(x.detach(), self.axis)
        mu, sd = rows.mean(1), rows.std(1, unbiased=False)
        lo, hi = mu - self.opts.sigmas * sd, mu + self.opts.sigmas * sd
        with torch.no_grad():
            self.lo.copy_(lo.expand_as(self.lo))
            self.hi.copy_(hi.expand_as(self.hi))
        return self.fake_quant(x, lo, hi)


class DSQActivation(_DSQBase):
    """Activations: BatchMinMax (per-image min and max averaged over the batch), tracked in training by an
    EMA with momentum 0.9 (``r <- 0.9 r + 0.1 batch``, like BN); evaluation uses the tracked range."""

    def init_from_tensor(self, x: Tensor) -> None:
        lo, hi = self.batch_min_max(x)
        self.init_from_range(lo, hi)

    @staticmethod
    def batch_min_max(x: Tensor) -> tuple[Tensor, Tensor]:
        rows = x.detach().reshape(x.shape[0], -1)
        mn, mx = torch.aminmax(rows, dim=1)
        return mn.mean().to(torch.float32), mx.mean().to(torch.float32)

    def quantize(self, x: Tensor) -> Tensor:
        if self.training:
            lo, hi = self.batch_min_max(x)
            m = self.opts.momentum
            with torch.no_grad():
                self.lo.mul_(m).add_((1 - m) * lo)
                self.hi.mul_(m).add_((1 - m) * hi)
        return self.fake_quant(x, self.lo, self.hi)


register_algorithm(Algorithm(
    "dsq", DSQWeight, DSQActivation, DSQOptions, learned=False,
    description="DSQ: tanh soft quantization (α 0.4) in the backward pass; weights μ±2.6σ, activations "
                "BatchMinMax EMA 0.9",
))
