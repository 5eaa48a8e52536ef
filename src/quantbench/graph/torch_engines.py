"""PyTorch's int8 engines (``torch.ops.quantized``) as the simulation computes them for ``arithmetic: torch-x86`` /
``torch-qnnpack``: the add and global-pool formulas of each engine, and which library the x86 engine runs a
convolution on. Each formula is checked against the kernel bit for bit in ``tests/test_torch_arithmetic.py``;
:mod:`quantbench.graph.requant` wires them into the integer path."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from quantbench.quant.quantizer import Quantizer

if TYPE_CHECKING:
    from quantbench.graph.qmodules import QuantWeighted


def scalar32(t: Tensor) -> Tensor:
    """A one-element tensor (a per-tensor scale) as a float32 scalar."""
    return t.reshape(()).to(torch.float32)


def _torch_uint8(q: Quantizer) -> float:
    """The shift PyTorch's kernels apply to a tensor: int8 runs as quint8 with codes and zero-point + 128."""
    return 128.0 if q.qmin < 0 else 0.0


def torch_add(ca: Tensor, cb: Tensor, qa: Quantizer, qb: Quantizer, qy: Quantizer) -> Tensor:
    """``torch.ops.quantized.add`` (x86 engine) on integer codes ``ca``, ``cb`` (float dtype, zero-point
    included): the output's pre-rounding float32 values with its zero-point, in the input codes' signedness."""
    f32, f64 = torch.float32, torch.float64

    def dequantize(c: Tensor, q: Quantizer) -> Tensor:  # fma(s, c, -s z): exact in float64, one rounding
        shift = _torch_uint8(q)
        s = scalar32(q.scale)
        neg_zs = (s * -(float(q.zero_point.reshape(-1)[0]) + shift)).to(f32)
        return (c.to(f64).add(shift).mul_(s.to(f64)).add_(neg_zs.to(f64))).to(f32)

    inv = torch.tensor(1.0 / float(scalar32(qy.scale)), dtype=f32)
    shift = _torch_uint8(qy)
    return torch.round((dequantize(ca, qa) + dequantize(cb, qb)) * inv).add_(
        float(qy.zero_point.reshape(-1)[0]) + shift).sub_(shift)


def torch_global_avg_pool(cx: Tensor, qx: Quantizer, qy: Quantizer) -> Tensor:
    """The x86 engine's quantized ``adaptive_avg_pool2d(x, 1)`` (at the input's scale and zero-point), then the
    requantization to ``qy``: the output codes (float dtype, zero-point included)."""
    shift = _torch_uint8(qx)
    n = cx.shape[-1] * cx.shape[-2]
    p = torch.round(cx.double().add(shift).sum(dim=(-2, -1), keepdim=True) / n)  # codes at the input's grid
    zx, zy = (float(q.zero_point.reshape(-1)[0]) for q in (qx, qy))
    sx, sy = scalar32(qx.scale), scalar32(qy.scale)
    if (float(sx), zx) == (float(sy), zy):
        return p.float().sub_(shift)
    v = (p.float() - (zx + shift)) * sx  # the dequantized pool, float32
    out_shift = _torch_uint8(qy)
    return torch.round(v * torch.tensor(1.0 / float(sy), dtype=torch.float32)).add_(zy + out_shift).sub_(out_shift)


def qnnpack_add(ca: Tensor, cb: Tensor, qa: Quantizer, qb: Quantizer, qy: Quantizer) -> Tensor:
    """``torch.ops.quantized.add`` on the QNNPACK engine, in fixed point (its add quantization parameters):
    ``acc = m_a a + m_b b - (m_a z_a + m_b z_b)`` in integers with ``m = lrint(2^(21 - e) r)``,
    ``r = float32(s / s_y)``, ``e`` the exponent of the larger ratio, then a rounding right shift by ``21 - e``
    (negative halves round away from zero, as the kernel's remainder test does). Output codes (float dtype,
    zero-point included)."""
    sy = scalar32(qy.scale)
    ra, rb = (scalar32(q.scale) / sy for q in (qa, qb))
    exponent = int(torch.frexp(torch.maximum(ra, rb)).exponent) - 1
    shift = 21 - exponent
    unit = torch.tensor(2.0 ** shift, dtype=torch.float32)
    ma, mb = (int(torch.round(unit * r)) for r in (ra, rb))
    sa, sb = _torch_uint8(qa), _torch_uint8(qb)
    za, zb = (int(q.zero_point.reshape(-1)[0]) + int(sh) for q, sh in ((qa, sa), (qb, sb)))
    acc = (ca.to(torch.int64) + int(sa)) * ma + (cb.to(torch.int64) + int(sb)) * mb - (ma * za + mb * zb)
    mask = (1 << shift) - 1
    rem = (acc & mask) - (acc < 0).to(torch.int64)
    out = (acc >> shift) + (rem > (mask >> 1)).to(torch.int64)
    return out.to(torch.float32).add_(float(qy.zero_point.reshape(-1)[0]))


def qnnpack_global_avg_pool(cx: Tensor, qx: Quantizer, qy: Quantizer) -> Tensor:
    """The QNNPACK engine's quantized ``adaptive_avg_pool2d(x, 1)``: ``rne(float32(sum - z_x N) * float32(s_x /
    (s_x N))) + z_x`` at the input's grid, then the requantization to ``qy`` (as :func:`torch_global_avg_pool`)."""
    shift = _torch_uint8(qx)
    n = cx.shape[-1] * cx.shape[-2]
    zx, zy = (float(q.zero_point.reshape(-1)[0]) for q in (qx, qy))
    sx, sy = scalar32(qx.scale), scalar32(qy.scale)
    acc = cx.double().add(shift).sum(dim=(-2, -1), keepdim=True) - (zx + shift) * n
    p = torch.round(acc.float() * (sx / (sx * torch.tensor(float(n), dtype=torch.float32)))) + (zx + shift)
    if (float(sx), zx) == (float(sy), zy):
        return p.sub_(shift)
    v = (p - (zx + shift)) * sx
    out_shift = _torch_uint8(qy)
    return torch.round(v * torch.tensor(1.0 / float(sy), dtype=torch.float32)).add_(zy + out_shift).sub_(out_shift)


def x86_conv_kernel(layer: QuantWeighted) -> str:
    """Which library PyTorch's x86 engine runs this layer on: ``onednn`` for convolutions with symmetric
    weights and at most 100 groups on Linux CPUs with AVX512-VNNI (``onednn_utils::should_use_onednn_quant``),
    ``fbgemm`` otherwise (and for every linear layer). It depends on the host, as the engine does."""
    wq = layer.weight_quantizer
    if layer.is_linear or wq is None or sys.platform != "linux" or not host_has_vnni():
        return "fbgemm"
    groups = getattr(layer.module, "groups", 1)
    return "onednn" if groups <= 100 and bool((wq.zero_point == 0).all()) else "fbgemm"


@cache
def host_has_vnni() -> bool:
    """Whether this CPU has AVX512-VNNI (asked once per process)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


#: ``arithmetic -> add(codes_a, codes_b, q_a, q_b, q_y)`` and ``arithmetic -> pool(codes_x, q_x, q_y)``
ADD_KERNELS: dict[str, Callable[..., Tensor]] = {"torch-x86": torch_add, "torch-qnnpack": qnnpack_add}
POOL_KERNELS: dict[str, Callable[..., Tensor]] = {"torch-x86": torch_global_avg_pool,
                                                  "torch-qnnpack": qnnpack_global_avg_pool}
