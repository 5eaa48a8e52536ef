"""Norm calibration (seed 001 section C.1, eq. 10) with LSQ's rule: ``s = 2 * mean(|x|) / N_max^(1/p)``.

``p = 2`` (LSQ's ``2 <|v|> / sqrt(Q_P)``) by default. ``mean(|x|)`` is accumulated exactly across
batches (per-row sums and counts in float64). ``N_max`` is the resolved ``qmax`` (taken as 1 for the
1-bit signed range ``[-1, 0]``, whose ``qmax`` is 0).

The scale is expressed as a clipping range from which ``qparams_from_range`` reproduces it:

* symmetric, signed: ``max_abs = s * (qmax - qmin) / 2``;
* symmetric, unsigned: ``hi = s * qmax``;
* asymmetric: ``lo = min(observed min, 0)``, ``hi = lo + s * (qmax - qmin)``. When that ``hi`` would be
  negative (a range of ``s * (qmax - qmin)`` cannot reach 0 from the observed minimum) the range is
  ``[-s * (qmax - qmin), 0]`` instead, so the scale is still ``s``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from quantbench.errors import ConfigError
from quantbench.observers.base import Observer, register_observer
from quantbench.observers.options import NormOptions
from quantbench.quant.scheme import QScheme


@register_observer("norm")
class NormObserver(Observer):
    """Options: ``p`` (norm order in ``N_max^(1/p)``, default 2)."""

    Options = NormOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, p: float = 2.0, **options: Any) -> None:
        super().__init__(scheme, is_weight, **options)
        p = float(p)
        if not (math.isfinite(p) and p > 0):
            raise ConfigError(f"norm p must be a positive number, got {p}")
        self.p = p
        self.abs_sum: Tensor | None = None  # (C,) float64
        self.count = 0  # values per row

    def _accumulate(self, rows: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        s = rows.abs().sum(1, dtype=torch.float64)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += rows.shape[1]

    def mean_abs(self) -> Tensor:
        """Per-row ``mean(|x|)`` ``(C,)`` float64."""
        self.check_ready()
        assert self.abs_sum is not None
        return self.abs_sum / self.count

    def lsq_scale(self) -> Tensor:
        """``s = 2 mean(|x|) / N_max^(1/p)`` ``(C,)`` float64."""
        _, qmax = self.qrange()
        return 2.0 * self.mean_abs() / max(qmax, 1) ** (1.0 / self.p)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        qmin, qmax = self.qrange()
        s = self.lsq_scale()
        if self.scheme.symmetric:
            if qmin < 0:
                amax = s * (qmax - qmin) / 2
                lo, hi = -amax, amax
            else:
                lo, hi = torch.zeros_like(s), s * qmax
        else:
            width = s * (qmax - qmin)
            lo = torch.maximum(self.min_val.to(torch.float64).clamp_max(0), -width)
            hi = lo + width
        return lo.to(torch.float32), hi.to(torch.float32)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"
