"""Differentiable building blocks shared by the QAT quantizers (straight-through estimators, gradient scale).

Everything here keeps the input dtype (float64 in the reference tests, float32 in training); callers cast
half-precision activations to float32 first.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` (half to even) in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(p: Tensor, g: float) -> Tensor:
    """``p`` in the forward pass, gradient multiplied by ``g`` (LSQ's gradient scale)."""
    y = p * g
    return (p - y).detach() + y


def pow2_ste(s: Tensor) -> Tensor:
    """``2^ceil(log2 s)`` (power-of-two scales, rounded up like TVM's calibration) with a straight-through
    gradient."""
    return s + (torch.exp2(torch.ceil(torch.log2(s))) - s).detach()


def broadcast(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Shape a per-channel parameter ``(C,)`` to broadcast along ``axis`` of ``x`` (one value: a scalar)."""
    if axis is None or p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def fake_quant_ste(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``(round(clamp(x / s + z, N_min, N_max)) - z) * s`` with the round passed straight through.

    ``scale`` and ``zero_point`` broadcast against ``x``; autograd then gives LSQ's gradients: ``dx`` is 1
    inside the range and 0 outside, ``ds`` is ``round(x/s) - x/s`` inside and ``N_min - z`` / ``N_max - z``
    outside, ``dz`` is 0 inside and ``-s`` outside (seed 001 F; Esser et al. 2020; LSQ+).
    """
    q = round_ste(torch.clamp(x / scale + zero_point, qmin, qmax))
    return (q - zero_point) * scale


def quant_error_ste(y: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``fake_quant(y)`` with ``d/dy = 1`` everywhere: the quantization error is a constant (STE over the whole
    range that the algorithm has already clipped, e.g. DoReFa, PACT, QIL)."""
    with torch.no_grad():
        err = fake_quant_ste(y, scale, zero_point, qmin, qmax) - y
    return y + err


def range_qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool,
                  floor_zero_point: bool = False, pow2: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and (float, integer-valued) zero-point of a clipping range, in ``lo``'s dtype, no gradient.

    The conventions of :func:`quantbench.quant.qparams.qparams_from_range`: symmetric signed ranges use
    ``max(|lo|, |hi|) / ((N_max - N_min) / 2)``, symmetric unsigned ``hi / N_max``, asymmetric
    ``(hi - lo) / (N_max - N_min)`` with ``z = N_min - round(lo / s)`` (``floor`` for DSQ, seed 001 F);
    ``pow2`` rounds the scale up to a power of two (TVM).
    """
    lo, hi = lo.detach(), hi.detach()
    eps = torch.finfo(lo.dtype).eps
    if symmetric:
        scale = torch.maximum(-lo, hi).clamp_min(0) / ((qmax - qmin) / 2) if qmin < 0 else hi.clamp_min(0) / qmax
        scale = _pow2(scale.clamp_min(eps), pow2)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    scale = _pow2(((hi - lo) / (qmax - qmin)).clamp_min(eps), pow2)
    offset = torch.floor(lo / scale) if floor_zero_point else torch.round(lo / scale)
    return scale, (qmin - offset).clamp(qmin, qmax)


def _pow2(scale: Tensor, on: bool) -> Tensor:
    return torch.exp2(torch.ceil(torch.log2(scale))) if on else scale


def per_channel_rows(x: Tensor, axis: int | None) -> Tensor:
    """``(C, n)`` view of ``x`` with one row per channel of ``axis`` (one row when ``axis`` is None)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)
