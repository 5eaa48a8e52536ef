"""Gaussian-optimal clipping of weights per output filter (seed 003 eq. 1 and App. B).

For ``b > 2`` bits seed 003 quantizes filter ``i`` as ``round(clamp(W_i, -a_i, a_i) / s_i) s_i`` with
``s_i = a_i / (2^(b-1) - 1)``, the clipping ``a_i`` minimising ``||Q(W_i) - W_i||^2`` under ``W_i ~ N(0, sigma^2)``.
That optimum is proportional to ``sigma`` and so to the filter's mean absolute value ``|W̄_i|``: App. B finds
``c_b = |W̄| / a*`` once, by simulation on Gaussian weights, and sets ``a_i = |W̄_i| / c_b`` on the fly. The paper
does not print the ``c_b``; :func:`gaussian_clip_ratio` re-derives them (golden-section search of the mean squared
error over ``a`` on ``n`` seeded Gaussian samples; checked against float64 quadrature in the tests).
"""

from __future__ import annotations

import math
from functools import cache

import torch
from torch import Tensor

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _mse(w: Tensor, a: float, levels: int) -> float:
    s = a / levels
    q = torch.round(torch.clamp(w, -a, a) / s) * s
    return float((q - w).square().mean())


def simulate_clip_ratio(bits: int, sigma: float = 1.0, n: int = 1 << 20, seed: int = 0,
                        iterations: int = 60) -> float:
    """``c_b = mean|W| / a*`` for ``W ~ N(0, sigma^2)`` (``n`` samples, float64), ``a*`` the MSE-optimal clipping
    of the ``2^(b-1) - 1``-level symmetric quantizer of eq. 1."""
    if not 3 <= bits <= 16:
        raise ValueError(f"Gaussian clipping is for 3-16 bits (seed 003 uses ternary / binary below), got {bits}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g, dtype=torch.float64) * sigma
    levels = 2 ** (bits - 1) - 1
    lo, hi = 0.5 * sigma, 12.0 * sigma
    x1, x2 = hi - GOLDEN * (hi - lo), lo + GOLDEN * (hi - lo)
    f1, f2 = _mse(w, x1, levels), _mse(w, x2, levels)
    for _ in range(iterations):  # the MSE is unimodal in a
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - GOLDEN * (hi - lo)
            f1 = _mse(w, x1, levels)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + GOLDEN * (hi - lo)
            f2 = _mse(w, x2, levels)
    return float(w.abs().mean()) / ((lo + hi) / 2)


@cache
def gaussian_clip_ratio(bits: int) -> float:
    """``c_b`` for ``bits`` (simulated once per process, seeded: the same value every run)."""
    return simulate_clip_ratio(bits)


def gaussian_clip_scale(w: Tensor, bits: int) -> Tensor:
    """Per-output-filter step ``s_i = |W̄_i| / (c_b (2^(b-1) - 1))`` of weights ``w`` (out, ...), shape ``(out,)``."""
    mean_abs = w.detach().abs().reshape(w.shape[0], -1).mean(dim=1)
    return mean_abs / (gaussian_clip_ratio(bits) * (2 ** (bits - 1) - 1))
