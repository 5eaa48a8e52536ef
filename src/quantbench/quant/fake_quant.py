"""Quantize, dequantize and fake-quantize with the straight-through estimator.

Arithmetic follows torch's native ``fake_quantize_per_*_affine`` kernels: ``q = clamp(round(x *
(1/s)) + z, N_min, N_max)`` with round half to even, then ``x_hat = (q - z) * s``. The gradient is
passed straight through where ``round(x/s) + z`` lies inside ``[N_min, N_max]`` and is zero outside.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _broadcast(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Shape a per-channel parameter to broadcast along ``axis`` of ``x`` (scalar: unchanged)."""
    if axis is None or p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> Tensor:
    """Integer codes of ``x`` (returned in x's float dtype, integral-valued)."""
    s = _broadcast(scale, x, axis).to(x.dtype)
    z = _broadcast(zero_point, x, axis).to(x.dtype)
    return torch.clamp(torch.round(x * torch.reciprocal(s)) + z, qmin, qmax)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values of integer codes ``q``."""
    s = _broadcast(scale, q, axis).to(q.dtype)
    z = _broadcast(zero_point, q, axis).to(q.dtype)
    return (q - z) * s


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        s = _broadcast(scale, x, axis).to(x.dtype)
        z = _broadcast(zero_point, x, axis).to(x.dtype)
        q = torch.round(x * torch.reciprocal(s)) + z
        mask = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(mask)
        return (torch.clamp(q, qmin, qmax) - z) * s

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> Tensor:
    """``dequantize(quantize(x))`` with the straight-through estimator for the gradient of ``x``."""
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis)
