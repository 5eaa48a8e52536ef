"""``fixed``: the PTQ calibrator's quantization parameters, kept fixed while the weights train."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import Tensor

from quantbench.quant.fake_quant import fake_quantize
from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm
from quantbench.quant.qparams import range_qparams
from quantbench.quant.ste import per_channel_rows


class FixedQuantizer(LearningRule):
    """``x_hat = (clamp(round(x / s) + z) - z) * s`` with the observer-calibrated ``s, z`` (buffers, not
    learned); the gradient of ``x`` is passed straight through inside the range (the PTQ fake quantizer).
    Only the network's weights learn (QAT of weights only). Without a calibrator it takes the min/max of
    the first batch."""

    algorithm = "fixed"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.register_buffer("scale", torch.ones(ctx.channels))
        self.register_buffer("zero_point", torch.zeros(ctx.channels, dtype=torch.int32))

    def init_from_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        self.scale.copy_(scale.detach().reshape(-1).expand(self.ctx.channels))
        self.zero_point.copy_(zero_point.detach().reshape(-1).expand(self.ctx.channels))
        self.mark_initialized()

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        s, z = range_qparams(lo.to(torch.float32), hi.to(torch.float32), self.qmin, self.qmax,
                             self.ctx.scheme.symmetric, pow2=self.pow2)
        self.init_from_qparams(s, z.to(torch.int32))

    def init_from_tensor(self, x: Tensor) -> None:
        rows = per_channel_rows(x.to(torch.float32), self.axis)
        self.init_from_range(rows.amin(1), rows.amax(1))

    def quantize(self, x: Tensor) -> Tensor:
        return fake_quantize(x, self.scale.to(x.dtype), self.zero_point, self.qmin, self.qmax, self.axis)

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        return self.scale.clone(), self.zero_point.to(torch.float32)


register_algorithm(Algorithm(
    "fixed", FixedQuantizer, FixedQuantizer, learned=False,
    description="observer-calibrated quantization parameters, not learned (QAT of the weights only)",
))
