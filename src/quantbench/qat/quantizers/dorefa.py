"""DoReFa-Net (Zhou et al. 2016; seed 001 F eq. 14-15): tanh-normalised weights, activations clipped to a range."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from quantbench.errors import ConfigError
from quantbench.quant.learning import Algorithm, LearningRule, QuantizerContext, register_algorithm
from quantbench.quant.qparams import range_qparams
from quantbench.quant.ste import per_channel_rows, quant_error_ste


class DoReFaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: multiply the normalised weight back by max|w| (a constant, no gradient), so a pretrained layer keeps
    #: its output magnitude (needed with BN folded); false gives eq. 14-15 literally (weights in [-1, 1])
    rescale: bool = True
    #: AdaBits' "modified" (centred) weight quantizer, the option seed 002 Table 5 compares: 2^b levels at the
    #: centres of 2^b equal bins of [-1, 1], ``q = (2 / n)(clip(floor(n (w~ + 1) / 2), 0, n - 1) + 1/2) - 1``
    #: (n levels); no level at zero, so no integer grid with an integer zero-point holds it (not exportable)
    centred_weights: bool = False


class DoReFaWeight(LearningRule):
    """``w~ = tanh(w) / max|tanh(w)|`` (eq. 14), ``w^ = dequantize(quantize(w~))`` (eq. 15).

    Scale ``2 / (N_max - N_min)`` for symmetric schemes, ``(max w~ - min w~) / (N_max - N_min)`` with
    ``z = N_min - round(min w~ / s)`` for asymmetric ones; the quantization is passed straight through
    (``d w^ / d w~ = 1``) and the gradient flows through the normalisation. Per-channel schemes normalise
    each output channel by its own maximum. Nothing is learned besides the weights.
    """

    algorithm = "dorefa"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        self.register_buffer("last_scale", torch.full((ctx.channels,), 2.0 / (ctx.qmax - ctx.qmin)))
        self.register_buffer("last_zero_point", torch.zeros(ctx.channels))
        self.register_buffer("last_rescale", torch.ones(ctx.channels))
        self.mark_initialized()  # nothing to initialise

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        """Fixed transform: a calibrator has nothing to set."""

    def init_from_tensor(self, x: Tensor) -> None:
        """Fixed transform: nothing to initialise."""

    def normalise(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(w~, max|w|)`` with the maxima shaped to broadcast over ``w``."""
        t = torch.tanh(w)
        tiny = torch.finfo(w.dtype).tiny
        t_max = self.shaped(per_channel_rows(t.abs(), self.axis).amax(1), w).clamp_min(tiny)
        w_max = self.shaped(per_channel_rows(w.detach().abs(), self.axis).amax(1), w)
        return t / t_max, w_max

    @property
    def centred(self) -> bool:
        return bool(getattr(self.options, "centred_weights", False))

    def grid_refusal(self) -> str | None:
        if self.centred:
            return ("has centred weight levels (AdaBits' modified quantizer: half a step off zero, no zero level), "
                    "which no integer grid with an integer zero-point holds")
        return None

    def quantize_centred(self, wn: Tensor) -> Tensor:
        """AdaBits' centred levels ``(2 / n)(k + 1/2) - 1``, ``k = clip(floor(n (w~ + 1) / 2), 0, n - 1)``; the
        rounding is passed straight through."""
        n = self.qmax - self.qmin + 1
        k = torch.floor(n * (wn.detach() + 1) / 2).clamp(0, n - 1)
        return wn + ((2.0 / n) * (k + 0.5) - 1 - wn).detach()

    def quantize(self, x: Tensor) -> Tensor:
        wn, w_max = self.normalise(x)
        if self.centred:
            if not self.ctx.scheme.symmetric:
                raise ConfigError(f"{self.ctx.name}: centred_weights needs symmetric weights (AdaBits' levels are "
                                  "symmetric about 0); this backend's weights are asymmetric")
            r = w_max if getattr(self.options, "rescale", True) else torch.ones_like(w_max)
            with torch.no_grad():
                self.last_rescale.copy_(r.reshape(-1).expand(self.ctx.channels))
            return self.quantize_centred(wn) * r
        if self.ctx.scheme.symmetric:
            s = torch.full((), 2.0 / (self.qmax - self.qmin), dtype=x.dtype)
            z = torch.zeros((), dtype=x.dtype)
        else:
            rows = per_channel_rows(wn.detach(), self.axis)
            s, z = range_qparams(rows.amin(1), rows.amax(1), self.qmin, self.qmax, False)
            s, z = self.shaped(s, x), self.shaped(z, x)
        y = quant_error_ste(wn, s, z, self.qmin, self.qmax)
        r = w_max if getattr(self.options, "rescale", True) else torch.ones_like(w_max)
        with torch.no_grad():
            self.last_scale.copy_((s * r).reshape(-1).expand(self.ctx.channels))
            self.last_zero_point.copy_(z.reshape(-1).expand(self.ctx.channels))
        return y * r

    def clip_range(self) -> tuple[Tensor, Tensor]:
        if self.centred:  # the outermost centred levels, +-(1 - 1/n), times the rescale of the last forward
            edge = 1.0 - 1.0 / (self.qmax - self.qmin + 1)
            return -edge * self.last_rescale, edge * self.last_rescale
        return super().clip_range()

    def export_qparams(self) -> tuple[Tensor, Tensor] | None:
        if self.centred:
            return None
        return self.last_scale.clone(), self.last_zero_point.clone()


class DoReFaActivation(LearningRule):
    """Clip to ``[0, 1]`` (academic setting, unsigned tensors) or ``[-1, 1]`` (hardware settings, and signed
    academic tensors such as the input image), then quantize that fixed range; STE inside, 0 outside."""

    algorithm = "dorefa"

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__(ctx, options)
        lo = 0.0 if not ctx.hardware and not ctx.signed else -1.0
        self.register_buffer("lo", torch.tensor(lo))
        self.register_buffer("hi", torch.tensor(1.0))
        self.mark_initialized()

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        """The range is fixed by the algorithm."""

    def init_from_tensor(self, x: Tensor) -> None:
        """The range is fixed by the algorithm."""

    def export_qparams(self) -> tuple[Tensor, Tensor]:
        return range_qparams(self.lo, self.hi, self.qmin, self.qmax, self.ctx.scheme.symmetric, pow2=self.pow2)

    def quantize(self, x: Tensor) -> Tensor:
        s, z = self.export_qparams()
        lo, hi = self.lo.to(x.dtype), self.hi.to(x.dtype)
        return quant_error_ste(torch.clamp(x, lo, hi), s.to(x.dtype), z.to(x.dtype), self.qmin, self.qmax)


register_algorithm(Algorithm(
    "dorefa", DoReFaWeight, DoReFaActivation, DoReFaOptions, learned=False, pow2_scales=False,
    description="DoReFa-Net: tanh-normalised weights (eq. 14-15), activations clipped to [0,1] / [-1,1]",
))
