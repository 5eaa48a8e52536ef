"""QIL: quantization interval learning (Jung et al. 2019; seed 001 F eq. 16-17)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm
from quantbench.quant.qparams import range_qparams
from quantbench.quant.ste import grad_scale, per_channel_rows, quant_error_ste


class QILOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gamma: float = Field(1.0, gt=0, description="fixed non-linearity of the weight transformer (not learned: "
                                                "learning it does not converge, seed 001 F)")
    #: multiply the transformed output by C + D (a constant, no gradient) so a pretrained layer keeps its
    #: magnitude; false gives eq. 16-17 literally (outputs in [-1, 1])
    rescale: bool = True


class QILQuantizer(LearningRule):
    """Interval transformer ``x~ = sign(x) clip((α|x| + β)^γ, 0, 1)`` with ``α = 1/(2D)``,
    ``β = -C/(2D) + 1/2`` (eq. 16), then ``dequantize(quantize(x~))`` on ``[-1, 1]`` (eq. 17).

    ``|x|`` in ``[C - D, C + D]`` maps to ``[0, 1]``; smaller magnitudes are pruned to 0, larger ones
    clipped to 1. C and D are learned with LSQ's gradient scale ``1 / sqrt(M N_max)``; γ is fixed (1 for
    activations). The quantizer step is ``1 / N_max`` for symmetric schemes (QIL's discretizer) and the
    ``[-1, 1]`` range's for asymmetric ones. With γ = 1 the output lies on a uniform grid.
    """

    algorithm = "qil"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.opts = options if isinstance(options, QILOptions) else QILOptions()
        self.center = self.param(0.5)
        self.distance = self.param(0.5)
        self.gamma = self.opts.gamma if ctx.is_weight else 1.0
        self._g = 0.0

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        c = torch.maximum(lo.abs(), hi.abs()).clamp_min(torch.finfo(torch.float32).eps)
        self.center.data.copy_((c / 2).expand_as(self.center))
        self.distance.data.copy_((c / 2).expand_as(self.distance))

    def init_from_tensor(self, x: Tensor) -> None:
        c = per_channel_rows(x.abs().to(torch.float32), self.axis).amax(1)
        self.init_from_range(-c, c)

    def step(self) -> tuple[Tensor, Tensor]:
        """Quantizer step and zero-point on the transformed ``[-1, 1]`` range."""
        if self.ctx.scheme.symmetric:
            return torch.tensor(1.0 / max(self.qmax, 1)), torch.tensor(0.0)
        return range_qparams(torch.tensor(-1.0), torch.tensor(1.0), self.qmin, self.qmax, False)

    def transform(self, x: Tensor) -> Tensor:
        if self._g == 0.0:
            m = x.numel() // self.ctx.channels if self.is_weight else x[0].numel()
            self._g = 1.0 / math.sqrt(max(m, 1) * max(self.qmax, 1))
        c = self.shaped(grad_scale(self.center, self._g), x).to(x.dtype)
        d = self.shaped(grad_scale(self.distance, self._g), x).to(x.dtype).clamp_min(torch.finfo(x.dtype).eps)
        t = torch.clamp(x.abs() / (2 * d) - c / (2 * d) + 0.5, 0.0, 1.0)
        if self.gamma != 1.0:
            t = t**self.gamma
        return torch.sign(x) * t

    def quantize(self, x: Tensor) -> Tensor:
        s, z = self.step()
        y = quant_error_ste(self.transform(x), s.to(x.dtype), z.to(x.dtype), self.qmin, self.qmax)
        if self.opts.rescale:
            y = y * self.shaped((self.center + self.distance).detach(), x).to(x.dtype)
        return y

    def export_qparams(self) -> tuple[Tensor, Tensor] | None:
        if self.gamma != 1.0:
            return None
        s, z = self.step()
        r = (self.center + self.distance).detach() if self.opts.rescale else torch.ones_like(self.center)
        return s * r, z.expand_as(r).clone()

    def clip_range(self) -> tuple[Tensor, Tensor]:
        hi = (self.center + self.distance).detach()
        return -hi if self.ctx.signed else torch.zeros_like(hi), hi


register_algorithm(Algorithm(
    "qil", QILQuantizer, QILQuantizer, QILOptions, pow2_scales=False,
    description="QIL: learnable interval (C, D) transformer with LSQ's gradient scale, γ fixed",
))
