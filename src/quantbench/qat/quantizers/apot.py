"""APoT: additive powers-of-two quantization with weight normalisation (Li et al. 2020; seed 001 F)."""

from __future__ import annotations

import itertools

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm

#: APoT's additive terms per magnitude bit-width (the authors' ``build_power_value``): each level is one
#: term from each list, normalised so the largest level is 1
_TERMS: dict[int, tuple[tuple[float, ...], ...]] = {
    2: ((0.0, 2**-1, 2**-2, 2**-3),),
    3: ((0.0, 2**-1, 2**-2, 2**-4), (0.0, 2**-3)),
    4: ((0.0, 2**-1, 2**-3, 2**-5), (0.0, 2**-2, 2**-4, 2**-6)),
    5: ((0.0, 2**-1, 2**-3, 2**-6), (0.0, 2**-2, 2**-4, 2**-7), (0.0, 2**-5)),
    6: ((0.0, 2**-1, 2**-4, 2**-7), (0.0, 2**-2, 2**-5, 2**-8), (0.0, 2**-3, 2**-6, 2**-9)),
}


def apot_levels(bits: int) -> Tensor:
    """The ``2^bits`` non-negative levels in [0, 1] (float64, sorted). Widths without additive terms (1 bit,
    or more than 6 such as 8-bit first/last layers) use uniform levels, which APoT reduces to."""
    if bits not in _TERMS:
        return torch.linspace(0.0, 1.0, 2**bits, dtype=torch.float64)
    values = sorted({sum(t) for t in itertools.product(*_TERMS[bits])})
    levels = torch.tensor(values, dtype=torch.float64)
    return levels / levels.max()


def project(v: Tensor, levels: Tensor) -> Tensor:
    """Nearest level of each ``v >= 0`` (ties to the lower level)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(v, mids)]


class _APoTFunction(torch.autograd.Function):
    """``alpha * P(clamp(x / alpha))`` with the authors' backward: ``dx`` passes through unclipped,
    ``d alpha = sign(x/alpha)`` where ``|x/alpha| > 1`` and ``P(x/alpha) - x/alpha`` inside."""

    @staticmethod
    def forward(ctx, x, alpha, levels, signed):  # type: ignore[override]
        xn = x / alpha
        lv = levels.to(x.dtype)
        if signed:
            c = xn.clamp(-1, 1)
            q = torch.sign(c) * project(c.abs(), lv)
        else:
            q = project(xn.clamp(max=1).clamp_min(0), lv)
        ctx.save_for_backward(xn, q)
        return q * alpha

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xn, q = ctx.saved_tensors
        outside = xn.abs() > 1
        grad_alpha = (grad * torch.where(outside, torch.sign(xn), q - xn)).sum().reshape(1)
        return grad, grad_alpha, None, None


class APoTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    weight_alpha_init: float = Field(3.0, gt=0, description="paper init of the weight clipping α (in std units)")
    act_alpha_init: float = Field(8.0, gt=0, description="paper init of the activation clipping α")
    #: multiply normalised weights back by their std (a constant) so a pretrained layer keeps its magnitude;
    #: false gives the authors' output (weights in units of their std)
    rescale: bool = True


class APoTQuantizer(LearningRule):
    """Levels ``α · {sums of powers of two}`` (non-uniform). Weights are first normalised,
    ``(w - mean) / std`` (statistics without gradient), and use a sign bit plus ``bits - 1`` magnitude bits;
    unsigned activations use all ``bits``. α is learned (one per tensor)."""

    algorithm = "apot"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.opts = options if isinstance(options, APoTOptions) else APoTOptions()
        self.signed = ctx.is_weight or ctx.signed
        self.register_buffer("levels", apot_levels(ctx.scheme.bits - 1 if self.signed else ctx.scheme.bits))
        self.alpha = torch.nn.Parameter(torch.tensor([self.opts.weight_alpha_init if ctx.is_weight
                                                      else self.opts.act_alpha_init]))
        self.register_buffer("pending_range", torch.zeros(1))  # > 0: a calibrated weight range to convert
        self._pending = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._pending = bool(self.pending_range.item() > 0)

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        c = torch.maximum(lo.abs(), hi.abs()).amax().reshape(1) if self.signed else hi.amax().reshape(1)
        if self.is_weight:
            self.pending_range.copy_(c)  # in weight units: converted to std units at the first forward
            self._pending = True
        else:
            self.alpha.data.copy_(c.clamp_min(torch.finfo(torch.float32).eps))

    def init_from_tensor(self, x: Tensor) -> None:
        """APoT starts from its constant α (3 for weights, in std units; 8 for activations)."""

    def normalise(self, w: Tensor) -> tuple[Tensor, Tensor]:
        mean, std = w.detach().mean(), w.detach().std().clamp_min(torch.finfo(w.dtype).eps)
        return (w - mean) / std, std

    def quantize(self, x: Tensor) -> Tensor:
        if not self.is_weight:
            return _APoTFunction.apply(x, self.alpha.to(x.dtype), self.levels, self.signed)
        wn, std = self.normalise(x)
        if self._pending:
            with torch.no_grad():
                self.alpha.copy_((self.pending_range / std).to(self.alpha.dtype))
                self.pending_range.zero_()
            self._pending = False
        y = _APoTFunction.apply(wn, self.alpha.to(x.dtype), self.levels, True)
        with torch.no_grad():
            self.last_std = std
        return y * std if self.opts.rescale else y

    def clip_range(self) -> tuple[Tensor, Tensor]:
        hi = self.alpha.detach().clone()
        if self.is_weight and self.opts.rescale and hasattr(self, "last_std"):
            hi = hi * self.last_std
        return (-hi if self.signed else torch.zeros_like(hi)), hi


register_algorithm(Algorithm(
    "apot", APoTQuantizer, APoTQuantizer, APoTOptions, pow2_scales=False,
    description="APoT: additive powers-of-two levels, weight normalisation (academic setting only)",
    academic_only="its levels are non-uniform (sums of powers of two), which no integer runtime executes, and "
                  "its weight normalisation has no place in a BN-folded graph (seed 001 F)",
))
