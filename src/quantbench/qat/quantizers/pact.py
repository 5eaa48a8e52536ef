"""PACT: parameterized clipping activation (Choi et al. 2018; seed 001 F, seed 002 section 3)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantbench.qat.quantizers.dorefa import DoReFaWeight
from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm
from quantbench.quant.qparams import range_qparams
from quantbench.quant.ste import quant_error_ste


class PACTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha_init: float = Field(6.0, gt=0, description="initial upper clipping value α (paper init)")
    beta_init: float = Field(-6.0, lt=0, description="initial lower clipping value β (asymmetric, paper init)")
    rescale: bool = True  # for the DoReFa weight quantizer PACT uses
    centred_weights: bool = False  # AdaBits' centred ("modified") DoReFa weights (see DoReFaOptions)


class PACTActivation(LearningRule):
    """Clip to ``[lo, α]`` with a learnable α, then quantize that range (scale not differentiated).

    ``lo`` is 0 for unsigned tensors, ``-α`` for symmetric signed ones and a learnable ``β`` for asymmetric
    signed ones (seed 001 F, hardware settings). The gradient reaches α only where ``x > α`` (``dα = 1``) and
    β only where ``x < β``; inside the range it passes to ``x`` straight through, and PACT does not scale it.
    """

    algorithm = "pact"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        opts = options if isinstance(options, PACTOptions) else PACTOptions()
        self.alpha = self.param(opts.alpha_init)
        self.mode = "unsigned" if not ctx.signed else ("symmetric" if ctx.scheme.symmetric else "asymmetric")
        if self.mode == "asymmetric":
            self.beta = self.param(opts.beta_init)

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        self.alpha.data.copy_(hi.clamp_min(torch.finfo(torch.float32).eps).expand_as(self.alpha))
        if self.mode == "asymmetric":
            self.beta.data.copy_(lo.clamp_max(0).expand_as(self.beta))

    def init_from_tensor(self, x: Tensor) -> None:
        """PACT starts from its constant α (6) and β (-6), not from data."""

    def lower(self) -> Tensor:
        if self.mode == "asymmetric":
            return self.beta
        if self.mode == "symmetric":
            return -self.alpha
        return torch.zeros_like(self.alpha)

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        return range_qparams(self.lower().detach(), self.alpha.detach(), self.qmin, self.qmax,
                             self.mode != "asymmetric", pow2=self.pow2)

    def quantize(self, x: Tensor) -> Tensor:
        a = self.alpha.to(x.dtype).reshape(())
        lo = self.lower().to(x.dtype).reshape(())
        y = torch.where(x > a, a, x)
        y = torch.where(y < lo, lo, y)
        s, z = self.export_qparams()
        # straight through: d y_q / d y = 1 on the whole clipped range
        return quant_error_ste(y, s.to(x.dtype).reshape(()), z.to(x.dtype).reshape(()), self.qmin, self.qmax)


register_algorithm(Algorithm(
    "pact", DoReFaWeight, PACTActivation, PACTOptions, pow2_scales=False,
    description="PACT: learnable activation clipping α (β for asymmetric), weights as DoReFa",
))
