"""Learning rules of the one quantizer: the interface, its construction context and the algorithm registry.

A :class:`~quantbench.quant.quantizer.Quantizer` optionally hosts one :class:`LearningRule` (``quantizer.rule``):
none for PTQ; LSQ, LSQ+, PACT, DSQ, DoReFa, APoT, QIL or ``fixed`` for QAT (registered in ``ALGORITHMS`` by the
modules of :mod:`quantbench.qat.quantizers`, one file each); room for reconstruction's learned rounding. While
the host is *learning*, its forward is the rule's; :meth:`Quantizer.bake` writes the grid the rule learned back
into the host's static scale and zero-point, so PTQ, QAT and export share one module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from quantbench.quant.fake_quant import broadcast
from quantbench.quant.scheme import QScheme
from quantbench.utils.registry import Patterns, Registry

if TYPE_CHECKING:
    from quantbench.quant.quantizer import Quantizer

_NARROW_FLOATS = (torch.float16, torch.bfloat16)


class NoOptions(BaseModel):
    """Algorithms without hyper-parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class QuantizerContext:
    """What a learning rule needs to know about the tensor its quantizer quantizes.

    ``qmin``/``qmax`` are the resolved integer range (adaptive signedness already decided by calibration);
    ``channels`` is the number of per-channel parameters (1 per tensor); ``hardware`` is False in the
    academic setting.
    """

    scheme: QScheme
    qmin: int
    qmax: int
    is_weight: bool
    name: str
    hardware: bool
    channels: int = 1

    @classmethod
    def from_quantizer(cls, q: Quantizer, hardware: bool) -> QuantizerContext:
        """The context of a calibrated quantizer."""
        channels = q.scale.numel() if q.scheme.per_channel else 1
        return cls(q.scheme, q.qmin, q.qmax, q.is_weight, q.name, hardware, channels)

    @property
    def signed(self) -> bool:
        return self.qmin < 0


class LearningRule(nn.Module):
    """How a quantizer learns (or keeps fixed) its quantization function, e.g. LSQ's step size.

    Subclasses implement :meth:`quantize` (the paper's forward with its gradient), :meth:`init_from_range`
    (initialisation from a PTQ calibrator's clipping range, seed 001 C.4) and :meth:`init_from_tensor` (the
    paper's own initialisation from data, used on the first batch when nothing initialised it).
    Half-precision inputs (bf16 autocast) are quantized in float32 and cast back.
    """

    algorithm: ClassVar[str] = ""

    def __init__(self, ctx: QuantizerContext, options: BaseModel) -> None:
        super().__init__()
        self.ctx = ctx
        self.options = options
        self.name = ctx.name
        self.register_buffer("initialized", torch.tensor(False))
        self._ready = False
        self.quantizing = True
        #: use ``torch.compile``-fused kernels where the rule has them (LSQ / LSQ+ per tensor)
        self.fused_kernels = False

    # ------------------------------------------------------------------ properties
    @property
    def qmin(self) -> int:
        return self.ctx.qmin

    @property
    def qmax(self) -> int:
        return self.ctx.qmax

    @property
    def is_weight(self) -> bool:
        return self.ctx.is_weight

    @property
    def axis(self) -> int | None:
        """The channel axis of per-channel parameters (None per tensor)."""
        return self.ctx.scheme.ch_axis if self.ctx.channels > 1 else None

    @property
    def pow2(self) -> bool:
        return self.ctx.scheme.scale_type == "pow2"

    def shaped(self, p: Tensor, x: Tensor) -> Tensor:
        """``p`` broadcast along the channel axis of ``x``."""
        return broadcast(p, x, self.axis)

    def param(self, value: float) -> nn.Parameter:
        """A learnable per-channel (or scalar) parameter filled with ``value``."""
        return nn.Parameter(torch.full((self.ctx.channels,), float(value)))

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_from_quantizer(self, q: Quantizer) -> None:
        """Start from a calibrated quantizer: its clipping range ``[(N_min - z) s, (N_max - z) s]``."""
        self.init_from_qparams(q.scale, q.zero_point)

    @torch.no_grad()
    def init_from_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        s = scale.detach().reshape(-1).to(torch.float32)
        z = zero_point.detach().reshape(-1).to(torch.float32)
        self.init_from_range((self.qmin - z) * s, (self.qmax - z) * s)
        self.mark_initialized()

    def init_from_range(self, lo: Tensor, hi: Tensor) -> None:
        raise NotImplementedError

    def init_from_tensor(self, x: Tensor) -> None:
        raise NotImplementedError

    def mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._ready = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.initialized)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if not self.quantizing:
            return x
        dt = x.dtype
        xc = x.float() if dt in _NARROW_FLOATS else x
        if not self._ready:
            with torch.no_grad():
                self.init_from_tensor(xc.detach())
            self.mark_initialized()
        return self.quantize(xc).to(dt)

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def quantize_dropping(self, x: Tensor, p: float) -> Tensor:
        """QDrop (reconstruction): each element keeps its float value with probability ``p``, else is quantized.
        Rules with a fused kernel for it override this; gradients reach ``x`` on both branches."""
        from quantbench.quant.drop import drop

        return drop(self(x), x, p)

    # ------------------------------------------------------------------ reporting / export
    def export_qparams(self) -> tuple[Tensor, Tensor] | None:
        """Scale and zero-point of the integer grid the output lies on (None for non-uniform levels)."""
        return None

    def grid_refusal(self) -> str | None:
        """Why the output lies on no integer grid, when :meth:`export_qparams` is None for another reason than
        non-uniform levels (the refusal of bake and export says it)."""
        return None

    def clip_range(self) -> tuple[Tensor, Tensor]:
        """The real range ``[lo, hi]`` the quantized output covers (per channel)."""
        qp = self.export_qparams()
        if qp is None:
            raise NotImplementedError
        s, z = qp
        return (self.qmin - z) * s, (self.qmax - z) * s

    def describe(self) -> dict[str, Any]:
        """Everything a checkpoint or report needs about this quantizer (plain lists)."""
        out: dict[str, Any] = {"name": self.name, "algorithm": self.algorithm, "weight": self.is_weight,
                               "bits": self.ctx.scheme.bits, "qmin": self.qmin, "qmax": self.qmax}
        with torch.no_grad():
            qp = self.export_qparams()
            if qp is not None:
                out["scale"] = qp[0].reshape(-1).tolist()
                out["zero_point"] = [int(v) for v in torch.round(qp[1]).reshape(-1).tolist()]
            try:
                lo, hi = self.clip_range()
            except NotImplementedError:  # a rule with neither an integer grid nor a clipping range
                return out
            out["clip_lo"], out["clip_hi"] = lo.reshape(-1).tolist(), hi.reshape(-1).tolist()
        return out

    def extra_repr(self) -> str:
        return f"{self.name}: {self.algorithm}, [{self.qmin}, {self.qmax}]"


@dataclass(frozen=True)
class Algorithm:
    """A registered QAT algorithm: its weight and activation learning rules and its options."""

    name: str
    weight: type[LearningRule]
    activation: type[LearningRule]
    options: type[BaseModel] = NoOptions
    description: str = ""
    #: non-empty: the reason it runs only in the academic setting (no BN folding, not deployable)
    academic_only: str = ""
    #: PTQ calibrators (weights, activations) that initialise it by default (seed 001 C.4)
    default_observers: tuple[str, str] = ("mse", "mse")
    learned: bool = True
    #: False: the weight scale follows a normalisation (max|w|, C + D...) and cannot be held to powers of two
    pow2_scales: bool = True
    #: True: the weight rule's scale is one per output filter (ternary / binary), so weights must be per-channel
    per_channel_weights: bool = False
    #: True: at 1 bit the weight rule outputs the binary grid {-1, +1}·s (seed 003 eq. 4), so 1-bit weights are allowed
    binary_weights: bool = False

    def build(self, ctx: QuantizerContext, options: BaseModel) -> LearningRule:
        cls = self.weight if ctx.is_weight else self.activation
        return cls(ctx, options)

    def parse_options(self, options: dict[str, Any] | None) -> BaseModel:
        """Validated options (pydantic: an unknown or out-of-range key is named in the error)."""
        return self.options.model_validate(options or {})


ALGORITHMS: Registry[Algorithm] = Registry("QAT algorithm")


def register_algorithm(algorithm: Algorithm) -> Algorithm:
    """Register a QAT algorithm (its learning rules); the registration line of a file in ``qat/quantizers/``."""
    return ALGORITHMS.add(algorithm.name, algorithm)


def list_algorithms(filter: Patterns = None, exclude: Patterns = None, deployable: bool | None = None) -> list[str]:
    """Registered QAT algorithm names matching the globs (``utils.registry.Registry.list``), optionally only those
    that run on hardware backends (``deployable=True``: not academic-only)."""
    return [n for n in ALGORITHMS.list(filter, exclude)
            if deployable is None or (not ALGORITHMS.get(n).academic_only) == deployable]
