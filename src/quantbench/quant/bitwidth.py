"""Learnable bit-widths (Uhlich et al. 2020; seed 004 App. A): rounding with a straight-through gradient and the
grid size as a differentiable function of the bit-width.

A bit-width ``b`` is rounded to the nearest member of an allowed set (every integer in a range, or e.g.
{2, 4, 8}) in the forward pass; the gradient passes straight through to the continuous ``b``. The number of
steps of a ``b``-bit grid, :func:`grid_steps`, is ``N_max - N_min`` = ``2^b - 1`` (``2^b - 2`` for a narrow
signed range), so a scale computed from a fixed range, ``range / grid_steps(b)``, carries the gradient of the
quantization error to ``b``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_to_allowed(b: Tensor, allowed: Tensor) -> Tensor:
    """The member of ``allowed`` (1-D, ascending) nearest to ``b`` (ties: the lower), exactly, in the forward
    pass; identity gradient (straight-through)."""
    idx = (b.detach().reshape(-1, 1) - allowed.reshape(1, -1)).abs().argmin(1).reshape(b.shape)
    return allowed[idx].to(b.dtype) + (b - b.detach())


def qrange_at(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer range ``[N_min, N_max]`` of a ``bits``-bit grid (as :meth:`QScheme.qrange`)."""
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + (1 if narrow else 0), 2 ** (bits - 1) - 1


def grid_steps(b: Tensor, narrow: bool = False) -> Tensor:
    """``N_max - N_min`` of a ``b``-bit grid, differentiable in ``b``: ``2^b - 1`` (``2^b - 2`` narrow signed)."""
    return torch.exp2(b) - (2.0 if narrow else 1.0)


def rescale(scale_at_rounded: Tensor, b: Tensor, narrow: bool = False) -> Tensor:
    """``scale_at_rounded`` in the forward pass (bit-exact), with the gradient of ``range / grid_steps(b)``:
    ``d s / d b = -s ln 2 2^b / grid_steps(b)``. ``b`` is the straight-through rounded bit-width."""
    ratio = grid_steps(b.detach(), narrow) / grid_steps(b, narrow)  # exactly 1.0 forward
    return scale_at_rounded * ratio
