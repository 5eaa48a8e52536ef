"""Observer base class: accumulate statistics of a tensor, produce a clipping range.

Every observer works on a 2-D view ``(C, n)`` of the tensor: ``C = 1`` per-tensor, ``C`` = size of
the channel axis per-channel. Subclasses implement ``_accumulate`` and ``compute_range``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from quantbench.errors import EmptyCalibrationError, NonFiniteError
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.scheme import QScheme
from quantbench.utils.registry import Registry

OBSERVERS: Registry[type[Observer]] = Registry("observer")


def register_observer(name: str):
    """Class decorator: register an observer under ``name`` and set its ``name`` attribute."""

    def deco(cls: type[Observer]) -> type[Observer]:
        cls.name = name
        OBSERVERS.add(name, cls)
        return cls

    return deco


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


class Observer(nn.Module):
    """Base observer. ``observe`` may be called once per calibration batch."""

    name: ClassVar[str] = "base"

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
        self.n_batches += 1

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
        """``(scale, zero_point, qmin, qmax)``; scale and zero-point have shape ``(C,)``."""
        qmin, qmax = self.qrange()
        lo, hi = self.compute_range()
        scale, zp = qparams_from_range(
            lo, hi, qmin, qmax, self.scheme.symmetric, self.scheme.scale_type == "pow2"
        )
        return scale, zp, qmin, qmax

    def extra_repr(self) -> str:
        return f"{self.scheme.describe()}, layer={self.layer_name}"
