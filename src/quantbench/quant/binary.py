"""Ternary (seed 003 eq. 3) and binary (seed 003 eq. 4) weight quantizers, per output filter.

Both use the straight-through estimator of seed 003 eq. 5 (identity gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _mean_abs_per_filter(w: Tensor) -> Tensor:
    """|W_bar_i| of eq. 2: mean absolute value of each output filter, shaped to broadcast."""
    return w.detach().abs().reshape(w.shape[0], -1).mean(dim=1).reshape(-1, *([1] * (w.dim() - 1)))


def _ste(w: Tensor, wq: Tensor) -> Tensor:
    """Forward value exactly ``wq``, gradient identity w.r.t. ``w`` (eq. 5).

    ``wq + (w - w.detach())`` adds an exact zero; the common ``w + (wq - w).detach()`` rounds twice
    and returns values an ulp off ``wq``, so a filter would show more than 2 / 3 distinct values.
    """
    return wq.detach() + (w - w.detach())


def ternary_quantize(w: Tensor, threshold: float = 0.7) -> Tensor:
    """Eq. 3: ``sign(W) * M * |W_bar|`` with ``M = 0`` where ``|W_ij| < 0.7 |W_bar_i|``."""
    m = _mean_abs_per_filter(w)
    keep = (w.detach().abs() >= threshold * m).to(w.dtype)
    return _ste(w, torch.sign(w.detach()) * keep * m)


def binary_quantize(w: Tensor) -> Tensor:
    """Eq. 4: ``sign(W) * |W_bar|``; zero weights map to ``+|W_bar|`` so every value is binary."""
    m = _mean_abs_per_filter(w)
    sign = torch.where(w.detach() >= 0, 1.0, -1.0).to(w.dtype)
    return _ste(w, sign * m)
