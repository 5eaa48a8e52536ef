"""Quantize, dequantize and fake-quantize with the straight-through estimator.

Arithmetic follows torch's native ``fake_quantize_per_*_affine`` kernels: ``q = clamp(round(x *
(1/s)) + z, N_min, N_max)`` with round half to even, then ``x_hat = (q - z) * s``. The gradient is
passed straight through where ``round(x/s) + z`` lies inside ``[N_min, N_max]`` and is zero outside.
Like those kernels, float16 / bfloat16 inputs are computed in float32 and the result is cast back
(computing in the narrow dtype would round ``x/s`` and the codes themselves, e.g. bfloat16 cannot
hold every integer above 256).
"""

from __future__ import annotations

import torch
from torch import Tensor

_NARROW_FLOATS = (torch.float16, torch.bfloat16)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (as torch's native kernels), else x's own dtype."""
    return torch.float32 if x.dtype in _NARROW_FLOATS else x.dtype


def broadcast(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Shape a per-channel parameter ``(C,)`` to broadcast along ``axis`` of ``x`` (one value: a scalar)."""
    if axis is None or p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> Tensor:
    """Integer codes of ``x`` (returned in x's float dtype, integral-valued)."""
    dt = _compute_dtype(x)
    s = broadcast(scale, x, axis).to(dt)
    z = broadcast(zero_point, x, axis).to(dt)
    return torch.clamp(torch.round(x.to(dt) * torch.reciprocal(s)) + z, qmin, qmax).to(x.dtype)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values of integer codes ``q``."""
    dt = _compute_dtype(q)
    s = broadcast(scale, q, axis).to(dt)
    z = broadcast(zero_point, q, axis).to(dt)
    return ((q.to(dt) - z) * s).to(q.dtype)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        dt = _compute_dtype(x)
        s = broadcast(scale, x, axis).to(dt)
        z = broadcast(zero_point, x, axis).to(dt)
        q = torch.round(x.to(dt) * torch.reciprocal(s)) + z
        mask = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(mask)
        return ((torch.clamp(q, qmin, qmax) - z) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> Tensor:
    """``dequantize(quantize(x))`` with the straight-through estimator for the gradient of ``x``."""
    return _FakeQuantSTE.apply(x, scale, zero_point, qmin, qmax, axis)


def quantize_div(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> Tensor:
    """ONNX QuantizeLinear then DequantizeLinear: ``(clamp(rne(x / s) + z) - z) * s`` computed in float32.

    ONNX (and ONNX Runtime's MLAS kernel) divides by the scale; :func:`fake_quantize` multiplies by its
    reciprocal like torch's native kernels. The two differ by an ulp, which decides a rounding tie now
    and then; backends simulated with ONNX Runtime's arithmetic use this form at inference.
    """
    s = broadcast(scale, x, axis).to(torch.float32)
    z = broadcast(zero_point, x, axis).to(torch.float32)
    qv = torch.div(x.to(torch.float32), s).round_().add_(z).clamp_(qmin, qmax)
    return qv.sub_(z).mul_(s).to(x.dtype)
