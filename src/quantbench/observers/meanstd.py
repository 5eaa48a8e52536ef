"""MeanStd calibration (seed 001 section C.1, eq. 11): ``mu +- alpha * sigma`` (alpha = 3, as LSQ+).

* symmetric: ``max_abs = max(|mu - alpha sigma|, |mu + alpha sigma|)`` (eq. 11);
* asymmetric: ``[mu - alpha sigma, mu + alpha sigma]`` clamped inside the observed ``[min, max]``.

``mu`` and ``sigma`` (population standard deviation) are per row (per channel when per-channel) and
accumulated exactly across batches in float64: each batch's count, mean and sum of squared deviations
are merged with Chan et al.'s pairwise update, the numerically stable form of keeping
``(n, sum x, sum x^2)`` (no cancellation when ``|mu| >> sigma``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from quantbench.errors import ConfigError
from quantbench.observers.base import Observer, register_observer
from quantbench.observers.options import MeanStdOptions
from quantbench.quant.scheme import QScheme


@register_observer("meanstd")
class MeanStdObserver(Observer):
    """Options: ``alpha`` (number of standard deviations, default 3)."""

    Options = MeanStdOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, alpha: float = 3.0,
                 **options: Any) -> None:
        super().__init__(scheme, is_weight, **options)
        alpha = float(alpha)
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"meanstd alpha must be a positive number, got {alpha}")
        self.alpha = alpha
        self.count = 0
        self.mean: Tensor | None = None  # (C,) float64
        self.m2: Tensor | None = None  # (C,) float64: sum of squared deviations from the mean

    def _accumulate(self, rows: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        x = rows.to(torch.float64)
        nb = x.shape[1]
        mean_b = x.mean(1)
        m2_b = (x - mean_b[:, None]).square().sum(1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = nb, mean_b, m2_b
            return
        na = self.count
        n = na + nb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2_b + delta.square() * (na * nb / n)
        self.count = n

    def mean_std(self) -> tuple[Tensor, Tensor]:
        """Per-row ``(mu, sigma)`` ``(C,)`` float64."""
        self.check_ready()
        assert self.mean is not None and self.m2 is not None
        return self.mean, torch.sqrt(self.m2.clamp_min(0) / self.count)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        mu, sigma = self.mean_std()
        lo, hi = mu - self.alpha * sigma, mu + self.alpha * sigma
        if self.scheme.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -amax, amax
            return lo.to(torch.float32), hi.to(torch.float32)
        return self.clamp_to_observed(lo, hi)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"
