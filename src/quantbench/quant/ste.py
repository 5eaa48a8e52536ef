"""Differentiable building blocks of the learning rules: straight-through estimators and gradient scaling.

Everything keeps the input dtype (float64 in the reference tests, float32 in training); callers cast
half-precision activations to float32 first. The non-differentiable arithmetic (qparams from a range,
power-of-two scales, the per-channel broadcast, fake quantization) lives in :mod:`quantbench.quant.qparams`
and :mod:`quantbench.quant.fake_quant`; the estimators here wrap it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantbench.quant.qparams import pow2_scale


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` (half to even) in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(p: Tensor, g: float) -> Tensor:
    """``p`` in the forward pass, gradient multiplied by ``g`` (LSQ's gradient scale)."""
    y = p * g
    return (p - y).detach() + y


def pow2_ste(s: Tensor) -> Tensor:
    """:func:`~quantbench.quant.qparams.pow2_scale` in the forward pass, straight-through gradient."""
    return s + (pow2_scale(s) - s).detach()


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


def per_channel_rows(x: Tensor, axis: int | None) -> Tensor:
    """``(C, n)`` view of ``x`` with one row per channel of ``axis`` (one row when ``axis`` is None)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)
