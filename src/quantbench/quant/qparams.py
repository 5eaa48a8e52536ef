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
    """Scale (float32) and zero-point (int32) for clipping ranges ``[lo, hi]`` (any shape).

    * symmetric, signed range:   ``s = max(|lo|, |hi|) / ((N_max - N_min) / 2)``, z = 0 (eq. 6)
    * symmetric, unsigned range: ``s = max(hi, 0) / N_max``, z = 0 (academic unsigned activations)
    * asymmetric: the range is widened to contain 0, ``s = (hi - lo) / (N_max - N_min)``,
      ``z = clamp(N_min - round(lo / s), N_min, N_max)`` (eq. 7)
    * ``pow2``: the scale is rounded up to a power of two, ``2^ceil(log2 s)``, as TVM's calibration
      does, so the calibrated range is never clipped (requantization becomes a shift).

    Scales are floored at float32 eps so an all-zero tensor gives a valid quantizer.
    """
    lo = lo.detach().to(torch.float32)
    hi = hi.detach().to(torch.float32)
    if symmetric:
        if qmin < 0:
            amax = torch.maximum(-lo, hi).clamp_min(0)
            scale = amax / ((qmax - qmin) / 2)
        else:
            scale = hi.clamp_min(0) / qmax
        scale = _finish_scale(scale, pow2)
        zp = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zp
    lo = lo.clamp_max(0)
    hi = hi.clamp_min(0)
    scale = _finish_scale((hi - lo) / (qmax - qmin), pow2)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


def _finish_scale(scale: Tensor, pow2: bool) -> Tensor:
    scale = scale.clamp_min(EPS)
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale
