"""Export-time stand-ins for the simulation's modules; their ``symbolic`` emits ONNX QDQ nodes.

* :class:`ExportQDQ` replaces an activation :class:`~quantbench.quant.quantizer.Quantizer`: one
  QuantizeLinear -> DequantizeLinear pair with the quantizer's own scale and zero-point (uint8 container for
  unsigned ranges, int8 for signed), preceded by a Clip when the range is narrower than the container
  (sub-8-bit or narrow ranges).
* :class:`ExportWeighted` replaces a :class:`~quantbench.graph.qmodules.QuantWeighted`: the folded weight
  as an int8/uint8 initializer of integer codes -> DequantizeLinear (``axis`` 0 when per-channel), the bias
  as int32 codes with scale ``s_in * s_w`` -> DequantizeLinear, then the plain Conv / Gemm.

Their ``forward`` computes exactly what the simulation computes, so tracing sees the same values. Every
``symbolic`` call is recorded (:func:`recording`, per export: the list lives on the modules being exported) so the
exported nodes can be named after the quantizers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantbench.graph import requant
from quantbench.graph.qmodules import QuantWeighted
from quantbench.quant.fake_quant import quantize_div
from quantbench.quant.quantizer import Quantizer


@dataclass(frozen=True)
class Emitted:
    """One recorded symbolic call: what it exported and for which quantizer / layer."""

    kind: str  # "activation" | "weight" | "bias"
    name: str


@contextmanager
def recording(module: nn.Module) -> Iterator[list[Emitted]]:
    """Collect the symbolic calls of one export of ``module``, in graph order (no module-global state: the
    list is handed to ``module``'s stand-ins for the duration and taken back afterwards)."""
    emitted: list[Emitted] = []
    stand_ins = [m for m in module.modules() if isinstance(m, (ExportQDQ, ExportWeighted))]
    for m in stand_ins:
        m.recorder = emitted
    try:
        yield emitted
    finally:
        for m in stand_ins:
            m.recorder = None


def _record(recorder: list[Emitted] | None, kind: str, name: str) -> None:
    if recorder is not None:
        recorder.append(Emitted(kind, name))


def container_dtype(qmin: int) -> torch.dtype:
    return torch.int8 if qmin < 0 else torch.uint8


class _QDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, clip, axis, name, rec):  # type: ignore[override]
        return quantize_div(x, scale, zero_point, qmin, qmax, axis)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax, clip, axis, name, rec):  # type: ignore[override]
        _record(rec, "activation", name)
        if clip is not None:
            lo = g.op("Constant", value_t=torch.tensor(clip[0], dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip[1], dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        kw = {"axis_i": axis} if axis is not None else {}
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class _DQConst(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis, kind, name, rec):  # type: ignore[override]
        if scale.numel() > 1:
            shape = [1] * codes.dim()
            shape[axis] = -1
            s, z = scale.reshape(shape), zero_point.reshape(shape)
        else:
            s, z = scale.reshape(()), zero_point.reshape(())
        return (codes.to(torch.float32) - z.to(torch.float32)) * s

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis, kind, name, rec):  # type: ignore[override]
        _record(rec, kind, name)
        kw = {"axis_i": axis} if axis is not None else {}
        return g.op("DequantizeLinear", codes, scale, zero_point, **kw)


class ExportQDQ(nn.Module):
    """One activation quantizer as QuantizeLinear -> DequantizeLinear (with a Clip for narrow ranges)."""

    def __init__(self, q: Quantizer, name: str, copy_of: str | None = None) -> None:
        super().__init__()
        self.copy_of = copy_of  # set for the copy placed before a clamp ORT would not fold
        self.keeps_int8 = requant.stays_int8(q)
        dtype = container_dtype(q.qmin)
        per_channel = q.axis is not None and q.scale.numel() > 1
        self.register_buffer("s", q.scale.detach().to(torch.float32).reshape(-1 if per_channel else ()).clone())
        self.register_buffer("z", q.zero_point.detach().reshape(-1 if per_channel else ()).to(dtype).clone())
        self.qmin, self.qmax = q.qmin, q.qmax
        self.axis = q.axis if per_channel else None
        self.qname = name
        self.recorder: list[Emitted] | None = None
        lo, hi = requant.container(q)
        self.clip: tuple[float, float] | None = None
        if (q.qmin, q.qmax) != (lo, hi):
            s, z = self.s.reshape(-1)[0], float(self.z.reshape(-1)[0])
            self.clip = (float(s * (q.qmin - z)), float(s * (q.qmax - z)))

    def forward(self, x: Tensor) -> Tensor:
        return _QDQ.apply(x, self.s, self.z, self.qmin, self.qmax, self.clip, self.axis, self.qname, self.recorder)


class ExportWeighted(nn.Module):
    """A quantized conv / linear: DequantizeLinear of integer weight (and int32 bias) initializers."""

    def __init__(self, layer: QuantWeighted, name: str) -> None:
        super().__init__()
        wq = layer.weight_quantizer
        assert wq is not None
        w, b = layer.folded_weight_bias()
        w, b = w.detach(), (b.detach() if b is not None else None)
        dtype = container_dtype(wq.qmin)
        per_channel = wq.scale.numel() > 1
        self.register_buffer("w_codes", requant.weight_codes(layer, w).to(dtype))
        self.register_buffer("w_scale", wq.scale.detach().to(torch.float32).reshape(-1 if per_channel else ()).clone())
        self.register_buffer("w_zp", wq.zero_point.detach().reshape(-1 if per_channel else ()).to(dtype).clone())
        self.weight_axis = wq.axis if per_channel else None
        self.lname = name
        self.recorder: list[Emitted] | None = None
        self.module = layer.module
        self.bias_quantized = False
        links = layer.links
        in_q = links.inputs[0] if links is not None else None
        if b is not None and in_q is not None and in_q.scale.numel() == 1:
            sb = requant.bias_scale(layer, in_q)
            self.register_buffer("b_codes", requant.quantize_bias(b, sb).to(torch.int32))
            self.register_buffer("b_scale", sb.expand_as(b).clone())
            self.register_buffer("b_zp", torch.zeros_like(b, dtype=torch.int32))
            self.bias_quantized = True
        elif b is not None:
            self.register_buffer("b_float", b.clone())
        self.has_bias = b is not None

    def forward(self, x: Tensor) -> Tensor:
        w = _DQConst.apply(self.w_codes, self.w_scale, self.w_zp, self.weight_axis,
                           "weight", self.lname, self.recorder)
        b = None
        if self.bias_quantized:
            b = _DQConst.apply(self.b_codes, self.b_scale, self.b_zp, 0, "bias", self.lname, self.recorder)
        elif self.has_bias:
            b = self.b_float
        if isinstance(self.module, nn.Linear):
            return F.linear(x, w, b)
        return self.module._conv_forward(x, w, b)  # type: ignore[union-attr]


class PlainAdd(nn.Module):
    """``a + b`` (exported as Add; ORT decides whether it becomes QLinearAdd)."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return a + b


class PlainGlobalAvgPool(nn.Module):
    """Global average pooling (exported as GlobalAveragePool)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, 1)
