"""LSQ: learned step size quantization (Esser et al. 2020; seed 001 F)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from quantbench.qat.quantizers.lsq_kernel import lsq_drop_fake_quant, lsq_fake_quant
from quantbench.quant.drop import drop_mask
from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm
from quantbench.quant.qparams import pow2_scale, range_qparams
from quantbench.quant.ste import per_channel_rows, pow2_ste


class LSQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grad_scale: bool = True  # scale the step-size gradient by 1/sqrt(M * N_max)


class LSQQuantizer(LearningRule):
    """``x_hat = (round(clamp(x / s + z, N_min, N_max)) - z) * s`` with a learnable step size ``s``.

    The round is passed straight through (one autograd function, :mod:`.lsq_kernel`), so
    ``d x_hat / d s`` is ``round(x/s) - x/s`` inside the range
    and ``N_min - z`` / ``N_max - z`` outside (LSQ eq. 3). The gradient of ``s`` is scaled by
    ``g = 1 / sqrt(M * N_max)``: ``M`` is the number of weights per output channel for per-channel weights,
    the number of weights for per-tensor weights, and the features per image for activations (LSQ's
    ``N_F``; independent of the batch size, so one process and several DDP processes learn alike). The
    zero-point of asymmetric schemes stays where initialisation put it (``lsq+`` learns it).
    Paper initialisation: ``s = 2 mean|x| / sqrt(N_max)``; asymmetric zero-point ``N_min`` for
    non-negative tensors.
    """

    algorithm = "lsq"
    learn_zero_point = False

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.scale = self.param(1.0)
        zp = torch.zeros(ctx.channels)
        if self.learn_zero_point and not ctx.scheme.symmetric:
            self.zero_point: Tensor = nn.Parameter(zp)
        else:
            self.register_buffer("zero_point", zp)
        self.register_buffer("grad_factor", torch.tensor(0.0))  # 0: not computed yet
        self._g = 0.0

    @property
    def n_max(self) -> int:
        return max(self.qmax, 1)

    def _set_grad_factor(self, x: Tensor) -> None:
        if not getattr(self.options, "grad_scale", True):
            self._g = 1.0
        else:
            m = x.numel() // self.ctx.channels if self.is_weight else x[0].numel()
            self._g = 1.0 / math.sqrt(max(m, 1) * self.n_max)
        self.grad_factor.fill_(self._g)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._g = float(self.grad_factor)

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        s, z = range_qparams(lo, hi, self.qmin, self.qmax, self.ctx.scheme.symmetric)
        self.scale.data.copy_(s.expand(self.ctx.channels))
        self.zero_point.data.copy_(z.expand(self.ctx.channels))

    def init_from_tensor(self, x: Tensor) -> None:
        rows = per_channel_rows(x.to(torch.float32), self.axis)
        s = 2 * rows.abs().mean(1) / math.sqrt(self.n_max)
        self.scale.data.copy_(s.clamp_min(torch.finfo(torch.float32).eps).expand(self.ctx.channels))
        z = torch.zeros(self.ctx.channels)
        if not self.ctx.scheme.symmetric:
            nonneg = rows.amin(1) >= 0
            z = torch.where(nonneg, float(self.qmin), float(round((self.qmin + self.qmax) / 2))).expand(
                self.ctx.channels)
        self.zero_point.data.copy_(z)
        self._set_grad_factor(x)

    def effective_scale(self) -> Tensor:
        """The step size the forward uses (power of two for pow2 backends, straight through)."""
        return pow2_ste(self.scale) if self.pow2 else self.scale

    def effective_zero_point(self) -> Tensor:
        return self.zero_point

    def quantize(self, x: Tensor) -> Tensor:
        if self._g == 0.0:
            self._set_grad_factor(x)
        learn_z = self.learn_zero_point and not self.ctx.scheme.symmetric
        return lsq_fake_quant(x, self.effective_scale(), self.effective_zero_point(), self.qmin, self.qmax,
                              self._g, self.axis, learn_z, self.ctx.scheme.symmetric, self.fused_kernels)

    def quantize_dropping(self, x: Tensor, p: float) -> Tensor:
        """QDrop's dropping fused with the LSQ kernel (one pass each way) where the fused kernels are on and the
        case is the per-tensor float32 one they cover; otherwise the generic mix."""
        fusable = (self.fused_kernels and self.axis is None and x.dtype == torch.float32 and self._ready
                   and not (self.learn_zero_point and not self.ctx.scheme.symmetric) and not self.pow2)
        if not fusable:
            return super().quantize_dropping(x, p)
        if self._g == 0.0:
            self._set_grad_factor(x)
        return lsq_drop_fake_quant(x, drop_mask(x, p), self.scale, self.zero_point, self.qmin, self.qmax, self._g)

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        s = pow2_scale(self.scale) if self.pow2 else self.scale
        z = torch.round(self.zero_point.clamp(self.qmin, self.qmax))
        return s.detach(), z.detach()


register_algorithm(Algorithm(
    "lsq", LSQQuantizer, LSQQuantizer, LSQOptions,
    description="learned step size (Esser et al. 2020), gradient scale 1/sqrt(M N_max), STE",
))
