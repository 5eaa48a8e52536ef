"""MinMax (seed 001 eq. 6) and its exponential-moving-average variant."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from quantbench.observers.base import Observer, register_observer
from quantbench.observers.options import EMAMinMaxOptions, NoOptions
from quantbench.quant.scheme import QScheme


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum over every batch seen (never clips: keeps no values)."""

    tracks_values = False
    Options = NoOptions


@register_observer("ema_minmax")
class EMAMinMaxObserver(Observer):
    """Per-batch min/max smoothed by an EMA: ``r <- m * r + (1 - m) * r_batch`` (m = 0.9)."""

    Options = EMAMinMaxOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, momentum: float = 0.9,
                 **options: Any) -> None:
        super().__init__(scheme, is_weight, **options)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ema_minmax momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.ema_lo: Tensor | None = None
        self.ema_hi: Tensor | None = None

    def _accumulate(self, rows: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        if self.ema_lo is None or self.ema_hi is None:
            self.ema_lo, self.ema_hi = batch_min.clone(), batch_max.clone()
        else:
            m = self.momentum
            self.ema_lo = m * self.ema_lo + (1 - m) * batch_min
            self.ema_hi = m * self.ema_hi + (1 - m) * batch_max

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self.check_ready()
        assert self.ema_lo is not None and self.ema_hi is not None
        return self.ema_lo, self.ema_hi
