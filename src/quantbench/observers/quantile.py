"""Quantile calibration (seed 001 section C.1, eq. 7): clip the ``1 - alpha`` tails.

* asymmetric: ``[quantile(x, 1 - alpha), quantile(x, alpha)]``;
* symmetric: ``max_abs = quantile(|x|, alpha)``.

The range is clamped inside the observed ``[min, max]``. Activations use a merged histogram of every
calibration batch (error below one bin width); weights (one tensor) are computed exactly, with
linear interpolation between order statistics like ``torch.quantile`` / ``np.quantile``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from quantbench.errors import ConfigError
from quantbench.observers.base import register_observer
from quantbench.observers.histogram import HistogramObserver
from quantbench.observers.options import QuantileOptions
from quantbench.quant.scheme import QScheme


def exact_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile ``(C,)`` float64 of a ``(C, n)`` tensor (linear interpolation).

    Sort-based, so it has no input-size limit (``torch.quantile`` refuses more than 2^24 elements).
    """
    n = rows.shape[1]
    s = torch.sort(rows, dim=1).values
    r = q * (n - 1)
    k0 = min(math.floor(r), n - 1)
    k1 = min(k0 + 1, n - 1)
    frac = r - k0
    a = s[:, k0].to(torch.float64)
    b = s[:, k1].to(torch.float64)
    return a + frac * (b - a)


@register_observer("quantile")
class QuantileObserver(HistogramObserver):
    """Options: ``alpha`` (quantile, default 0.9999, in [0.5, 1]); ``bins`` (activation histogram
    bins, default 2048)."""

    exact_weights = True
    Options = QuantileOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, alpha: float = 0.9999,
                 bins: int = 2048, **options: Any) -> None:
        super().__init__(scheme, is_weight, bins=bins, **options)
        alpha = float(alpha)
        if not 0.5 <= alpha <= 1.0:
            raise ConfigError(f"quantile alpha must be in [0.5, 1], got {alpha}")
        self.alpha = alpha

    def _quantile(self, q: float, absolute: bool) -> Tensor:
        if self.uses_raw:
            assert self.raw is not None
            rows = self.raw.abs() if absolute else self.raw
            return exact_quantile(rows, q)
        return self.hist.quantile(q)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self.check_ready()
        if self.scheme.symmetric:
            amax = self._quantile(self.alpha, absolute=True)
            lo, hi = -amax, amax
        else:
            lo = self._quantile(1.0 - self.alpha, absolute=False)
            hi = self._quantile(self.alpha, absolute=False)
        return self.clamp_to_observed(lo, hi)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
