"""MQBench's per-batch calibrators smoothed across batches: ``ema_mse``, ``ema_quantile``, and ``clipstd``.

``ema_mse`` and ``ema_quantile`` compute a range on *each* calibration batch with this project's ``mse``
/ ``quantile`` rule (same candidates, histogram and arithmetic; a batch's adaptive signedness is its
own) and smooth the per-batch ranges with an exponential moving average, as MQBench's ``EMAMSEObserver``
and ``EMAQuantileObserver`` do: the first batch's range, then ``r <- m * r + (1 - m) * r_batch``
(``momentum`` m = 0.9, MQBench's ``ema_ratio``). Unlike ``mse`` / ``quantile``, which search the merged
histogram of every batch, the result depends on batch order and size; that is the point of the EMA
variants (a running estimate that follows drifting statistics).

``clipstd`` is MQBench's ``ClipStdObserver``: the union of the observed range and ``mu +- k * sigma``
(``std_scale`` k = 2.6, ``sigma`` the sample standard deviation, ddof 1), i.e. ``[min(mu - k sigma,
min), max(mu + k sigma, max)]``; symmetric schemes use the larger magnitude on both sides. It never clips
the observed data: it widens a range that is narrower than ``k`` standard deviations. Mean and variance
are accumulated exactly across batches (MQBench keeps only the last batch).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantbench.observers.base import Observer, register_observer
from quantbench.observers.meanstd import MeanStdObserver
from quantbench.observers.mse import MSEObserver
from quantbench.observers.options import ClipStdOptions, EMAMSEOptions, EMAQuantileOptions
from quantbench.observers.quantile import QuantileObserver
from quantbench.quant.scheme import QScheme


def check_momentum(name: str, momentum: Any) -> float:
    from quantbench.errors import ConfigError

    m = float(momentum)
    if not 0.0 <= m < 1.0:
        raise ConfigError(f"{name} momentum must be in [0, 1), got {momentum!r}")
    return m


def _no_unknown(obs: Observer, options: dict[str, Any]) -> None:
    if options:
        raise TypeError(f"observer {obs.name!r} got unknown options: {sorted(options)}")


class _EMARangeObserver(Observer):
    """Base: per-batch range from a fresh ``inner`` observer on the batch's rows, smoothed by an EMA."""

    inner: type[Observer]

    def __init__(self, scheme: QScheme, is_weight: bool = False, momentum: float = 0.9,
                 **inner_options: Any) -> None:
        super().__init__(scheme, is_weight)
        self.momentum = check_momentum(self.name, momentum)
        self.inner_options = inner_options
        # the rows (C, n) are already the observer view: an inner per-channel scheme on axis 0 keeps them
        self.row_scheme = scheme.model_copy(update={"ch_axis": 0}) if scheme.per_channel else scheme
        self._new_inner()  # validates the inner options now
        self.ema_lo: Tensor | None = None
        self.ema_hi: Tensor | None = None

    def _new_inner(self) -> Observer:
        return self.inner(self.row_scheme, is_weight=self.is_weight, **self.inner_options)

    def _accumulate(self, rows: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        inner = self._new_inner()
        inner.layer_name = self.layer_name
        inner.observe(rows)
        lo, hi = inner.compute_range()
        if self.ema_lo is None or self.ema_hi is None:
            self.ema_lo, self.ema_hi = lo.clone(), hi.clone()
        else:
            m = self.momentum
            self.ema_lo = m * self.ema_lo + (1 - m) * lo
            self.ema_hi = m * self.ema_hi + (1 - m) * hi

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self.check_ready()
        assert self.ema_lo is not None and self.ema_hi is not None
        return self.ema_lo, self.ema_hi

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in sorted(self.inner_options.items()))
        return f"{super().extra_repr()}, momentum={self.momentum}{opts}"


@register_observer("ema_mse")
class EMAMSEObserver(_EMARangeObserver):
    """MQBench EMA-MSE: each batch's ``mse`` range, EMA-smoothed. Options ``momentum`` (0.9),
    ``num_candidates`` (100), ``bins`` (2048)."""

    inner = MSEObserver
    Options = EMAMSEOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, momentum: float = 0.9,
                 num_candidates: int = 100, bins: int = 2048, **options: Any) -> None:
        _no_unknown(self, options)
        super().__init__(scheme, is_weight, momentum, num_candidates=num_candidates, bins=bins)


@register_observer("ema_quantile")
class EMAQuantileObserver(_EMARangeObserver):
    """MQBench EMA-quantile: each batch's ``quantile`` range, EMA-smoothed. Options ``momentum`` (0.9),
    ``alpha`` (0.99999, MQBench's threshold), ``bins`` (2048)."""

    inner = QuantileObserver
    Options = EMAQuantileOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, momentum: float = 0.9,
                 alpha: float = 0.99999, bins: int = 2048, **options: Any) -> None:
        _no_unknown(self, options)
        super().__init__(scheme, is_weight, momentum, alpha=alpha, bins=bins)


@register_observer("clipstd")
class ClipStdObserver(MeanStdObserver):
    """MQBench ClipStd: ``[min(mu - k sigma, min), max(mu + k sigma, max)]`` (never clips). Option
    ``std_scale`` (k, default 2.6)."""

    Options = ClipStdOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, std_scale: float = 2.6,
                 **options: Any) -> None:
        from quantbench.errors import ConfigError

        _no_unknown(self, options)
        try:
            super().__init__(scheme, is_weight, alpha=std_scale)
        except ConfigError:
            raise ConfigError(f"clipstd std_scale must be a positive number, got {std_scale!r}") from None
        self.std_scale = self.alpha

    def compute_range(self) -> tuple[Tensor, Tensor]:
        self.check_ready()
        assert self.mean is not None and self.m2 is not None
        sigma = torch.sqrt(self.m2.clamp_min(0) / max(self.count - 1, 1))  # sample std (ddof 1), as torch.std
        k = self.std_scale
        lo = torch.minimum(self.mean - k * sigma, self.min_val.to(torch.float64))
        hi = torch.maximum(self.mean + k * sigma, self.max_val.to(torch.float64))
        if self.scheme.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -amax, amax
        return lo.to(torch.float32), hi.to(torch.float32)

    def extra_repr(self) -> str:
        return f"{Observer.extra_repr(self)}, std_scale={self.std_scale}"
