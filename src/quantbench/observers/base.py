"""Observer base class: accumulate statistics of a tensor, produce a clipping range.

Every observer works on a 2-D view ``(C, n)`` of the tensor: ``C = 1`` per-tensor, ``C`` = size of
the channel axis per-channel. Subclasses implement ``_accumulate`` and ``compute_range``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from quantbench.errors import EmptyCalibrationError, NonFiniteError
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.scheme import QScheme
from quantbench.utils.registry import Registry

OBSERVERS: Registry[type[Observer]] = Registry("observer")

log = logging.getLogger(__name__)

#: Warn when a calibrated quantizer clips more than this share of the values its observer saw (all rows
#: together; a value counts as clipped when it lies more than one step beyond the grid's end values, i.e.
#: its clamping error exceeds twice the largest rounding error): 5 % for activations, 10 % for weights. A
#: calibrator that clips more has usually mis-fit a spike or a sparse histogram (the digits input under the
#: old KLD: 97 %); MSE-optimal clipping of a Gaussian clips about 1 % at 4 bits and 3 % at 3 bits, so these
#: thresholds only speak at 2 bits or on a failure (an LSQ-style ``norm`` range on 2-bit weights clips
#: 5-30 %).
CLIP_WARN_ACTIVATIONS = 0.05
CLIP_WARN_WEIGHTS = 0.10
TRACK_BINS = 256  # bins of the histogram kept by observers that keep no values of their own


class ClippingWarning(UserWarning):
    """A calibrated quantizer clips more than the stated share of the values it observed."""


def _named(name: str, cls: type[Observer]) -> type[Observer]:
    cls.name = name
    return cls


def register_observer(name: str):
    """Class decorator: register an observer under ``name`` and set its ``name`` attribute."""
    return OBSERVERS.register(name, wrap=_named)


def list_observers(filter: str | list[str] | None = None, exclude: str | list[str] | None = None) -> list[str]:
    """Registered observer names, sorted, optionally filtered by glob(s) (``list_observers("ema_*")``)."""
    return OBSERVERS.list(filter, exclude)


def to_rows(x: Tensor, scheme: QScheme) -> Tensor:
    """The ``(C, n)`` float32 view an observer works on."""
    x = x.detach().to(torch.float32)
    if scheme.per_channel:
        axis = scheme.ch_axis % x.dim()
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return x.reshape(1, -1)


def row_aminmax(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row min and max of a ``(C, n)`` tensor. One row uses the global reduction, which torch
    runs many times faster than ``aminmax(dim=1)`` on a single long row."""
    if rows.shape[0] == 1:
        mn, mx = torch.aminmax(rows)
        return mn.reshape(1), mx.reshape(1)
    return torch.aminmax(rows, dim=1)


def raw_outside(rows: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Share ``(C,)`` float64 of each row's values outside ``[lo[c], hi[c]]``."""
    lo = lo.to(rows.dtype)[:, None]
    hi = hi.to(rows.dtype)[:, None]
    return ((rows < lo) | (rows > hi)).to(torch.float64).mean(1)


class Observer(nn.Module):
    """Base observer. ``observe`` may be called once per calibration batch."""

    name: ClassVar[str] = "base"
    #: keep a coarse histogram (activations) or the latest tensor (weights) to measure clipping;
    #: observers that keep their own values, or cannot clip (minmax), set this to False.
    tracks_values: ClassVar[bool] = True
    #: the declared options (a pydantic model, see :mod:`quantbench.observers.options`)
    Options: ClassVar[type[Any]]

    def __init__(self, scheme: QScheme, is_weight: bool = False, **options: Any) -> None:
        super().__init__()
        if options:
            raise TypeError(f"observer {self.name!r} got unknown options: {sorted(options)}")
        self.scheme = scheme
        self.is_weight = is_weight
        self.layer_name = "<unnamed>"
        self.register_buffer("min_val", torch.empty(0), persistent=False)
        self.register_buffer("max_val", torch.empty(0), persistent=False)
        self.n_batches = 0
        self.clip_warned = False
        self._track_hist: Any = None  # MergeableHistogram, for activations of tracking observers
        self._track_raw: Tensor | None = None  # latest tensor, for weights of tracking observers

    # -- accumulation --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        self.observe(x)
        return x

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Add one batch of statistics."""
        if x.numel() == 0:
            return
        rows = to_rows(x, self.scheme)
        mn, mx = row_aminmax(rows)
        if not (torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise NonFiniteError(
                f"NaN or inf reached the observer of {self.layer_name!r}: check the model's weights and "
                "inputs (e.g. a diverged checkpoint or unnormalised data) before calibrating"
            )
        if self.n_batches == 0:
            self.min_val, self.max_val = mn.clone(), mx.clone()
        else:
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)
        self._accumulate(rows, mn, mx)
        if self.tracks_values:
            self._track(rows, mn, mx)
        self.n_batches += 1

    def _track(self, rows: Tensor, mn: Tensor, mx: Tensor) -> None:
        if self.is_weight:
            self._track_raw = rows.clone()
            return
        if self._track_hist is None:
            from quantbench.observers.histogram import MergeableHistogram

            self._track_hist = MergeableHistogram(TRACK_BINS)
        self._track_hist.add(rows, mn, mx)

    def _accumulate(self, rows: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        """Subclass hook: fold one batch (rows and their per-row min/max) into the statistics."""

    # -- results -------------------------------------------------------------------------------
    def check_ready(self) -> None:
        if self.n_batches == 0:
            raise EmptyCalibrationError(
                f"the observer of {self.layer_name!r} saw no data: run calibration batches through the "
                "model before computing quantization parameters (is the calibration set empty?)"
            )

    def signed(self) -> bool:
        """Resolved signedness (adaptive: unsigned when everything observed is >= 0)."""
        self.check_ready()
        return self.scheme.is_signed(float(self.min_val.min()))

    def qrange(self) -> tuple[int, int]:
        return self.scheme.qrange(self.signed())

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """Clipping range ``(lo, hi)``, each of shape ``(C,)``. Default: the observed min/max."""
        self.check_ready()
        return self.min_val, self.max_val

    def clamp_to_observed(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` clamped inside the observed ``[min, max]``, as float32."""
        mn, mx = self.min_val.to(lo.dtype), self.max_val.to(hi.dtype)
        lo = torch.minimum(torch.maximum(lo, mn), mx)
        hi = torch.minimum(torch.maximum(hi, mn), mx)
        return lo.to(torch.float32), hi.to(torch.float32)

    def calculate_qparams(self) -> tuple[Tensor, Tensor, int, int]:
        """``(scale, zero_point, qmin, qmax)``; scale and zero-point have shape ``(C,)``.

        Warns (:class:`ClippingWarning`, and an INFO log record, once per observer) when the quantizer clips more
        than :data:`CLIP_WARN_ACTIVATIONS` / :data:`CLIP_WARN_WEIGHTS` of the observed values of a row.
        """
        qmin, qmax = self.qrange()
        lo, hi = self.compute_range()
        scale, zp = qparams_from_range(
            lo, hi, qmin, qmax, self.scheme.symmetric, self.scheme.scale_type == "pow2"
        )
        if qmax - qmin >= 2:  # a 1-bit grid {-1, 0}·s is calibrated only to be replaced by the binary rule (seed 003)
            self.check_clipping(scale, zp, qmin, qmax)
        return scale, zp, qmin, qmax

    # -- clipping ------------------------------------------------------------------------------
    def clipped_fraction(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Share ``(C,)`` float64 of the observed values of each row outside ``[lo, hi]`` (``(C,)``).

        Exact on a kept tensor (weights); on a histogram only bins entirely outside count (an
        undercount by at most one bin's mass per end). Observers that keep nothing return zeros."""
        from quantbench.observers.histogram import histogram_outside

        if self._track_raw is not None:
            return raw_outside(self._track_raw, lo, hi)
        if self._track_hist is not None and not self._track_hist.empty:
            return histogram_outside(self._track_hist, lo, hi)
        return torch.zeros(self.min_val.shape, dtype=torch.float64, device=self.min_val.device)

    def clip_threshold(self) -> float:
        return CLIP_WARN_WEIGHTS if self.is_weight else CLIP_WARN_ACTIVATIONS

    def check_clipping(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> float:
        """The share of observed values (all rows) more than one step beyond the grid ``[qmin, qmax]``;
        warns once when it exceeds :meth:`clip_threshold`."""
        s = scale.to(torch.float64)
        z = zero_point.to(torch.float64)
        share = self.clipped_fraction((qmin - z - 1) * s, (qmax - z + 1) * s)
        worst = float(share.mean()) if share.numel() else 0.0  # rows hold equally many values
        limit = self.clip_threshold()
        if worst > limit and not self.clip_warned:
            self.clip_warned = True
            what = "weights" if self.is_weight else "activations"
            msg = (
                f"quantizer {self.layer_name!r}: the {self.name!r} calibration clips {worst:.1%} of the "
                f"observed {what} (more than {limit:.0%}); its range [{float((qmin - z[0]) * s[0]):.4g}, "
                f"{float((qmax - z[0]) * s[0]):.4g}] (first row) may be a calibrator failure: check the quantizer "
                "(--list-quantizers) or try another observer"
            )
            log.info(msg)  # the warning itself reaches the user; the log keeps a record without printing it twice
            warnings.warn(msg, ClippingWarning, stacklevel=3)
        return worst

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, layer={self.layer_name}"


from quantbench.observers.options import NoOptions  # noqa: E402  (options imports nothing from here)

Observer.Options = NoOptions
