"""AdaRound's learned rounding (Nagel et al. 2020) as a learning rule of the one weight quantizer.

``W~ = s * (clip(floor(W / s) + h(V) + z, N_min, N_max) - z)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``. The scale and
zero-point come from the calibrator and never change; only ``V`` learns. ``V`` starts where ``h(V)`` equals
the fractional part of ``W / s``, so the soft weight starts at the float weight (inside the clip range).
:attr:`AdaRoundRule.hard` switches to the final rounding ``floor(W / s) + 1[V >= 0]``; baking writes that
weight as an ordinary static grid, so export and ``verify`` see a PTQ model.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext

ZETA, GAMMA = 1.1, -0.1


class AdaRoundOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdaRoundRule(LearningRule):
    """Learned up/down rounding of each weight on the calibrated grid (the scale stays fixed)."""

    algorithm = "adaround"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.register_buffer("scale", torch.ones(ctx.channels))
        self.register_buffer("zero_point", torch.zeros(ctx.channels))
        self.alpha = nn.Parameter(torch.zeros(0))  # V, shaped like the weight once it is seen
        self.register_buffer("w_floor", torch.zeros(0))
        self.hard = False

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_from_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        """Keep the calibrated grid; ``V`` is set from the weight on the first call (:meth:`init_from_tensor`)."""
        self.scale.copy_(scale.detach().reshape(-1).float().expand(self.ctx.channels))
        self.zero_point.copy_(zero_point.detach().reshape(-1).float().expand(self.ctx.channels))

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:  # pragma: no cover - grid comes from init_from_qparams
        raise NotImplementedError("AdaRound keeps the calibrated grid: initialise with init_from_qparams")

    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        """``V = -log((zeta - gamma) / (rest - gamma) - 1)`` with ``rest = W/s - floor(W/s)``."""
        ws = x.float() / self.shaped(self.scale, x)
        self.w_floor = torch.floor(ws)
        rest = ws - self.w_floor
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    # ------------------------------------------------------------------ forward
    def soft(self) -> Tensor:
        """``h(V)`` in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def quantize(self, x: Tensor) -> Tensor:
        s, z = self.shaped(self.scale, x), self.shaped(self.zero_point, x)
        up = (self.alpha >= 0).to(x.dtype) if self.hard else self.soft()
        q = torch.clamp(self.w_floor + up + z, self.qmin, self.qmax)
        return (q - z) * s

    def regularizer(self, beta: float) -> Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: pushes every ``h(V)`` to 0 or 1."""
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def codes(self) -> Tensor:
        """The integer codes of the final (hard) rounding."""
        z = self.shaped(self.zero_point, self.w_floor)
        return torch.clamp(self.w_floor + (self.alpha >= 0).float() + z, self.qmin, self.qmax)

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        return self.scale.detach(), self.zero_point.detach()


ADAROUND = Algorithm("adaround", AdaRoundRule, AdaRoundRule, AdaRoundOptions,
                     description="AdaRound learned rounding (Nagel et al. 2020); reconstruction only")


class LinearTempDecay:
    """AdaRound's beta: ``start`` until ``warmup * iters``, then linear to ``end`` at the last iteration."""

    def __init__(self, iters: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> None:
        self.iters, self.warmup_iters, self.start, self.end = iters, warmup * iters, start, end

    def __call__(self, t: int) -> float:
        if t < self.warmup_iters:
            return self.start
        rel = (t - self.warmup_iters) / max(self.iters - self.warmup_iters, 1)
        return self.end + (self.start - self.end) * max(0.0, 1 - rel)

    def regularizing(self, t: int) -> bool:
        """Whether the rounding regulariser is on at step ``t`` (off during the warm-up)."""
        return t >= self.warmup_iters


def lp_loss(pred: Tensor, target: Tensor, p: float = 2.0) -> Tensor:
    """The reference codes' reconstruction loss: ``|pred - target|^p`` summed over channels (dim 1),
    averaged over the batch and positions (BRECQ / QDrop / MQBench ``lp_loss``; AdaRound's lambda = 0.01
    is tuned for this normalisation)."""
    d = (pred - target).abs().pow(p)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def sigmoid_inverse(h: float) -> float:
    """``V`` with ``h(V) = h`` (for tests and initialisation checks)."""
    return -math.log((ZETA - GAMMA) / (h - GAMMA) - 1)
