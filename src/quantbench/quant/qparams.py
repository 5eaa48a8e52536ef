"""From a clipping range to scale and zero-point (seed 001 eq. 6-7, seed 004 section 2)."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps


def qparams_from_range(
    lo: Tensor,
    hi: Tensor,
    qmin: int,
    qmax: int,
    symmetric: bool,
    pow2: bool = False,
) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero-point (int32) for clipping ranges ``[lo, hi]`` (any shape): :func:`range_qparams`
    in float32."""
    scale, zp = range_qparams(lo.detach().to(torch.float32), hi.detach().to(torch.float32), qmin, qmax,
                              symmetric, pow2=pow2)
    return scale, zp.to(torch.int32)


def range_qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool, pow2: bool = False,
                  floor_zero_point: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and (float, integer-valued) zero-point of clipping ranges ``[lo, hi]``, in ``lo``'s dtype, no
    gradient -- the one definition every quantizer, calibrator and learning rule uses.

    * symmetric, signed range:   ``s = max(|lo|, |hi|) / ((N_max - N_min) / 2)``, z = 0 (eq. 6)
    * symmetric, unsigned range: ``s = max(hi, 0) / N_max``, z = 0 (academic unsigned activations)
    * asymmetric: the range is widened to contain 0, ``s = (hi - lo) / (N_max - N_min)``,
      ``z = clamp(N_min - round(lo / s), N_min, N_max)`` (eq. 7)
    * ``pow2``: the scale is rounded up to a power of two, ``2^ceil(log2 s)``, as TVM's calibration
      does, so the calibrated range is never clipped (requantization becomes a shift).
    * ``floor_zero_point``: ``z = N_min - floor(lo / s)`` (DSQ, seed 001 F).

    Scales are floored at the dtype's eps so an all-zero tensor gives a valid quantizer.
    """
    lo, hi = lo.detach(), hi.detach()
    eps = torch.finfo(lo.dtype).eps
    if symmetric:
        scale = torch.maximum(-lo, hi).clamp_min(0) / ((qmax - qmin) / 2) if qmin < 0 else hi.clamp_min(0) / qmax
        scale = scale.clamp_min(eps)
        scale = pow2_scale(scale) if pow2 else scale
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(eps)
    scale = pow2_scale(scale) if pow2 else scale
    offset = torch.floor(lo / scale) if floor_zero_point else torch.round(lo / scale)
    return scale, (qmin - offset).clamp(qmin, qmax)


def pow2_scale(scale: Tensor) -> Tensor:
    """``2^ceil(log2 s)``: the scale rounded up to a power of two (TVM), so a calibrated range is never clipped."""
    return torch.exp2(torch.ceil(torch.log2(scale)))
