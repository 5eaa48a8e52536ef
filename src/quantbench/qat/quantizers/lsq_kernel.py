"""LSQ / LSQ+ fake quantization as one autograd function: fewer passes over memory than the op-by-op form.

Forward: ``y = (round(clamp(x / s + z, N_min, N_max)) - z) * s``. Backward (LSQ eq. 3, seed 001 F), with
``v = x / s + z`` and ``inside = N_min <= v <= N_max``:

* ``dx = dy * inside``
* ``ds = g * sum(dy * (round(clamp(v)) - z - inside * (v - z)))`` (``round(v) - x/s`` inside, ``N_min - z`` /
  ``N_max - z`` outside)
* ``dz = g * sum(dy * -s * (1 - inside))``

summed per channel for per-channel parameters. Only ``x`` is saved (the output may be modified in place by
the graph, e.g. a residual ``+=``).

Op by op, PyTorch makes a pass over memory per operation. ``fused=True`` compiles the per-tensor forward and
backward with ``torch.compile`` (one C++/OpenMP loop on CPU, one Triton kernel on CUDA) into about the memory
traffic of a copy; the op-by-op path stays the reference and the fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from quantbench.quant.fake_quant import broadcast
from quantbench.quant.ste import per_channel_rows as _rows


def _fwd_math(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    return ((x / s + z).clamp(qmin, qmax).round() - z) * s


def _bwd_math(x: Tensor, s: Tensor, z: Tensor, grad: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor, Tensor]:
    xs = x / s
    v = xs + z
    vc = v.clamp(qmin, qmax)
    gx = grad * (vc == v)
    return gx, (grad * (vc.round() - z) - gx * xs).sum(), (grad - gx).sum()


@cache
def _compiled() -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor, Tensor]]]:
    return torch.compile(_fwd_math, dynamic=True), torch.compile(_bwd_math, dynamic=True)


def _fused(on: bool, x: Tensor, axis: int | None) -> bool:
    return on and axis is None and x.dtype == torch.float32


def _shape(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    return p.reshape(()) if axis is None else broadcast(p, x, axis)


class LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, axis, learn_z, zero_z, fused):  # type: ignore[override]
        ctx.save_for_backward(x, scale, zero_point)
        ctx.cfg = (qmin, qmax, grad_factor, axis, learn_z, zero_z, fused)
        if _fused(fused, x, axis):
            return _compiled()[0](x, scale.reshape(()), zero_point.reshape(()).to(x.dtype), qmin, qmax)
        s = _shape(scale, x, axis).to(x.dtype)
        v = x / s
        if zero_z:
            v.clamp_(qmin, qmax).round_().mul_(s)
        else:
            z = _shape(zero_point, x, axis).to(x.dtype)
            v.add_(z).clamp_(qmin, qmax).round_().sub_(z).mul_(s)
        return v

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, g, axis, learn_z, zero_z, fused = ctx.cfg
        if _fused(fused, x, axis):
            gx, gs, outside = _compiled()[1](x, scale.reshape(()), zero_point.reshape(()).to(x.dtype), grad, qmin, qmax)
            gz = (-outside * scale * g).reshape(zero_point.shape).to(zero_point.dtype) if learn_z else None
            return gx, (gs * g).reshape(scale.shape).to(scale.dtype), gz, None, None, None, None, None, None, None
        s = _shape(scale, x, axis).to(x.dtype)
        z = None if zero_z else _shape(zero_point, x, axis).to(x.dtype)
        xs = x / s  # x / s = v - z
        vc = xs.clamp(qmin, qmax) if z is None else (xs + z).clamp_(qmin, qmax)
        inside = (vc == xs) if z is None else (vc == xs + z)
        gx = grad * inside  # (a bool-mask where() is several times slower on CPU)
        vc.round_()
        if z is not None:
            vc.sub_(z)
        # ds = sum(dy * (round(clamp(v)) - z)) - sum(dy * inside * x / s)
        gs = (_dot(grad, vc, axis) - _dot(gx, xs, axis)) * g
        gz = None
        if learn_z:
            outside = _rows(grad, axis).sum(1) - _rows(gx, axis).sum(1)
            gz = (-outside * scale.reshape(-1).to(x.dtype) * g).reshape(zero_point.shape).to(zero_point.dtype)
        return gx, gs.reshape(scale.shape).to(scale.dtype), gz, None, None, None, None, None, None, None


def _dot(a: Tensor, b: Tensor, axis: int | None) -> Tensor:
    """``sum(a * b)`` per channel of ``axis`` (all elements when None) without an elementwise temporary."""
    if axis is None:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1)
    ra, rb = _rows(a, axis), _rows(b, axis)
    return torch.bmm(ra.unsqueeze(1), rb.unsqueeze(2)).reshape(-1)


def lsq_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, grad_factor: float,
                   axis: int | None, learn_zero_point: bool = False, zero_is_zero: bool = False,
                   fused: bool = False) -> Tensor:
    """LSQ fake quantization with gradient scale ``grad_factor`` on ``scale`` (and ``zero_point`` when
    learned). ``scale``/``zero_point`` have one entry, or one per channel of ``axis``; ``zero_is_zero`` (symmetric
    schemes) skips the zero-point arithmetic; ``fused`` uses the ``torch.compile``-fused kernels for per-tensor
    float32 tensors (needs a C++ compiler on CPU, Triton on CUDA; the first call of each kind compiles)."""
    return LSQFunction.apply(x, scale, zero_point, qmin, qmax, grad_factor, axis, learn_zero_point, zero_is_zero,
                             fused)


# ------------------------------------------------------------------------------------------ QDrop
def _drop_fwd_math(x: Tensor, m: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    q = ((x / s + z).clamp(qmin, qmax).round() - z) * s
    return torch.where(m != 0, x, q)  # exact on both branches (q + m (x - q) is not, by an ulp)


def _drop_bwd_math(x: Tensor, m: Tensor, s: Tensor, z: Tensor, grad: Tensor, qmin: int,
                   qmax: int) -> tuple[Tensor, Tensor]:
    xs = x / s
    v = xs + z
    vc = v.clamp(qmin, qmax)
    inside = (vc == v).to(x.dtype)
    gq = grad * (1 - m)  # the gradient that reaches the quantized branch
    gx = grad * m + gq * inside
    return gx, (gq * (vc.round() - z - inside * xs)).sum()


@cache
def _compiled_drop() -> tuple[Callable[..., Tensor], Callable[..., tuple[Tensor, Tensor]]]:
    return torch.compile(_drop_fwd_math, dynamic=True), torch.compile(_drop_bwd_math, dynamic=True)


class LSQDropFunction(torch.autograd.Function):
    """``lerp(lsq(x), x, m)`` in one fused pass each way (QDrop's dropping of an LSQ activation quantizer; ``m`` is
    the 0/1 mask of elements that keep their float value). Per-tensor scale, zero-point not learned."""

    @staticmethod
    def forward(ctx, x, m, scale, zero_point, qmin, qmax, grad_factor):  # type: ignore[override]
        ctx.save_for_backward(x, m, scale, zero_point)
        ctx.cfg = (qmin, qmax, grad_factor)
        return _compiled_drop()[0](x, m, scale.reshape(()), zero_point.reshape(()).to(x.dtype), qmin, qmax)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, m, scale, zero_point = ctx.saved_tensors
        qmin, qmax, g = ctx.cfg
        gx, gs = _compiled_drop()[1](x, m, scale.reshape(()), zero_point.reshape(()).to(x.dtype), grad, qmin, qmax)
        return gx, None, (gs * g).reshape(scale.shape).to(scale.dtype), None, None, None, None


def lsq_drop_fake_quant(x: Tensor, mask: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                        grad_factor: float) -> Tensor:
    """Fused ``lerp(lsq_fake_quant(x), x, mask)`` for a per-tensor float32 ``x`` (``torch.compile``)."""
    return LSQDropFunction.apply(x, mask, scale, zero_point, qmin, qmax, grad_factor)


def fused_kernels_available(device: str = "cpu") -> bool:
    """Whether ``torch.compile`` can build the fused kernels here (a C++ compiler on CPU, Triton on CUDA): one
    small forward and backward of each fused function, compiled once per process; False on any failure, and
    when ``QUANTBENCH_NO_COMPILE=1`` (the test suite sets it: compiling costs seconds per process)."""
    if os.environ.get("QUANTBENCH_NO_COMPILE") == "1":
        return False
    return compile_probe(device)


@cache
def compile_probe(device: str = "cpu") -> bool:
    """Compile and run the fused kernels once on small tensors; True when that worked."""
    try:
        x = torch.randn(2, 3, 5, 5, device=device, requires_grad=True)
        s = torch.full((1,), 0.1, device=device, requires_grad=True)
        z = torch.zeros(1, device=device)
        m = (torch.rand_like(x) < 0.5).to(x.dtype)
        lsq_drop_fake_quant(x, m, s, z, 0, 15, 1.0).sum().backward()
        lsq_fake_quant(x, s, z, 0, 15, 1.0, None, fused=True).sum().backward()
        return True
    except Exception:
        return False
