"""Run an exported QDQ ONNX model on PyTorch's own int8 CPU kernels (``torch.ops.quantized``: FBGEMM/oneDNN for the
``x86`` engine, QNNPACK for ``qnnpack``), node by node.

The model is read after constant folding (:func:`~quantbench.deploy.ort.constant_folded`). Every value is one of

* a float tensor;
* :class:`Codes`: the integer output of a ``QuantizeLinear`` (and of data movement on it: ``Slice``, ``Pad``, ...);
* :class:`Deq`: a ``DequantizeLinear`` of runtime codes, kept as codes plus ``(scale, zero point)``;
* :class:`Weight`: a ``DequantizeLinear`` of a constant (weights, int32 biases);
* :class:`Pending`: a compute op whose inputs are all quantized, waiting for its output ``QuantizeLinear``.

A ``QuantizeLinear`` of a pending ``Conv``/``Gemm``/``MatMul``/``Add``/``GlobalAveragePool`` (with the ``Relu`` or
``Clip`` between them fused) runs the engine's integer kernel with that output scale and zero point, as a model made
by ``torch.ao``'s ``convert_fx`` would. Anything else runs in float on dequantized inputs and is reported as a float
op with the reason. Signed int8 activations (the kernels take only ``quint8``) are shifted by 128, codes and zero
point alike: the same real values and the same saturation, exactly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import Tensor

from quantbench.deploy.errors import RuntimeUnavailableError
from quantbench.deploy.runtimes.base import OpReport
from quantbench.deploy.runtimes.onnx_ops import (
    MOVEMENT_OPS,
    Unsupported,
    attrs,
    conv_padding,
    float_op,
    move,
    pad_tensor,
    scalar,
)

QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool")


@contextlib.contextmanager
def engine(name: str, threads: int | None = None) -> Iterator[None]:
    """PyTorch's quantized engine (and thread count) set to ``name`` for the block, restored after."""
    before, before_threads = torch.backends.quantized.engine, torch.get_num_threads()
    torch.backends.quantized.engine = name
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():  # quantized tensor creation is deprecated in torch 2.14, still the API
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            yield
    finally:
        torch.backends.quantized.engine = before
        torch.set_num_threads(before_threads)


@dataclass
class Codes:
    """Integer codes (``torch.uint8`` or ``torch.int8``) of a QuantizeLinear output."""

    t: Tensor


@dataclass
class Deq:
    """``DequantizeLinear(codes, scale, zero_point)`` of runtime codes, per tensor."""

    codes: Tensor
    scale: float
    zp: int

    def float(self) -> Tensor:
        return (self.codes.to(torch.int32) - self.zp).to(torch.float32) * torch.tensor(self.scale, dtype=torch.float32)

    def qtensor(self) -> Tensor:
        """The engine's ``quint8`` tensor of the same real values (signed codes shifted by 128)."""
        codes, zp = _unsigned(self.codes, self.zp)
        return torch._make_per_tensor_quantized_tensor(codes, self.scale, zp)


@dataclass
class Weight:
    """``DequantizeLinear`` of a constant: codes, scale(s), zero point(s), and the axis when per channel."""

    codes: Tensor
    scale: Tensor
    zp: Tensor
    axis: int | None

    def float(self) -> Tensor:
        s, z = self.scale, self.zp
        if self.axis is not None and s.numel() > 1:
            shape = [1] * self.codes.dim()
            shape[self.axis] = -1
            s, z = s.reshape(shape), z.reshape(shape)
        return ((self.codes.to(torch.int64) - z.to(torch.int64)).to(torch.float64) * s.to(torch.float64)).float()

    def qtensor(self, transpose: bool = False) -> Tensor:
        """The engine's ``qint8`` weight (per channel along the output axis, or per tensor)."""
        if self.codes.dtype not in (torch.int8, torch.uint8):
            raise Unsupported(f"weights stored as {self.codes.dtype}; the engine takes int8 weights")
        zp = self.zp.long()
        codes = self.codes
        if codes.dtype == torch.uint8:  # the same values as int8: codes and zero points - 128
            codes, zp = (codes.to(torch.int16) - 128).to(torch.int8), zp - 128
        codes, axis = (codes.t(), (1 - self.axis) if self.axis is not None else None) if transpose \
            else (codes, self.axis)
        if self.scale.numel() == 1:
            return torch._make_per_tensor_quantized_tensor(codes.contiguous(), float(self.scale), int(zp))
        if axis != 0:
            raise Unsupported(f"weights quantized per channel along axis {axis}; the engine wants the output axis 0")
        return torch._make_per_channel_quantized_tensor(codes.contiguous(), self.scale.double(), zp, 0)


@dataclass
class Pending:
    """A compute node whose inputs are all quantized; ``act`` the ``(lo, hi)`` bounds of the Relu / Clip ops
    between it and its QuantizeLinear (fused: the codes are clamped, exact for a monotone quantizer)."""

    node: onnx.NodeProto
    inputs: list[Any]
    act: tuple[float, float] | None = None

    def clamped(self, lo: float, hi: float) -> Pending:
        old_lo, old_hi = self.act or (-math.inf, math.inf)
        return Pending(self.node, self.inputs, (max(old_lo, lo), min(old_hi, hi)))


def _unsigned(codes: Tensor, zp: int) -> tuple[Tensor, int]:
    if codes.dtype == torch.int8:
        return (codes.to(torch.int16) + 128).to(torch.uint8), zp + 128
    return codes, zp


def _to_float(v: Any) -> Tensor:
    return v.float() if isinstance(v, (Deq, Weight)) else v


# ---- integer kernels ------------------------------------------------------------------------------------------------

def _out_qparams(scale: float, zp: int, dtype: torch.dtype) -> tuple[float, int]:
    return scale, zp + 128 if dtype == torch.int8 else zp


def _back(y: Tensor, dtype: torch.dtype) -> Tensor:
    """The kernel's ``quint8`` result as codes of the QuantizeLinear's type."""
    codes = y.int_repr()
    return (codes.to(torch.int16) - 128).to(torch.int8) if dtype == torch.int8 else codes


RELU = (0.0, math.inf)


def _relu_first(p: Pending) -> bool:
    """Whether the kernel's fused-ReLU variant applies (the bounds start at 0; an upper bound is clamped after)."""
    return p.act is not None and p.act[0] == 0.0


def _grid_codes(bounds: tuple[float, float], x: Deq) -> tuple[int, int] | None:
    """The codes of ``bounds`` on ``x``'s grid (infinite bounds: the code range), or None when one is off it."""
    dtype_lo, dtype_hi = (-128, 127) if x.codes.dtype == torch.int8 else (0, 255)
    out = []
    for b, default in zip(bounds, (dtype_lo, dtype_hi), strict=True):
        if math.isinf(b):
            out.append(default)
            continue
        q = b / x.scale
        if abs(q - round(q)) > 1e-3:
            return None
        out.append(min(max(round(q) + x.zp, dtype_lo), dtype_hi))
    return out[0], out[1]


class Kernels:
    """The engine's integer kernels for pending nodes; weights are packed once per node and kept."""

    def __init__(self) -> None:
        self.packed: dict[str, Any] = {}

    def run(self, p: Pending, scale: float, zp: int, dtype: torch.dtype) -> Tensor:
        op = p.node.op_type
        if op == "Conv":
            y = self._conv(p, scale, zp, dtype)
        elif op in ("Gemm", "MatMul"):
            y = self._linear(p, scale, zp, dtype)
        elif op == "Add":
            y = self._add(p, scale, zp, dtype)
        elif op == "GlobalAveragePool":
            y = self._pool(p, scale, zp, dtype)
        else:  # pragma: no cover - pending only holds QUANTIZED_OPS
            raise Unsupported(op)
        codes = _back(y, dtype)
        # Q(clip(v)) = clip(Q(v)) with the bounds quantized (the fused-ReLU kernels did the bare ReLU)
        if p.act is not None and (p.act != RELU or op == "GlobalAveragePool"):
            lo, hi = (torch.round(torch.tensor(b, dtype=torch.float32) / scale).clamp(-1e6, 1e6) + zp
                      for b in p.act)
            codes = codes.to(torch.int32).clamp(int(lo), int(hi)).to(codes.dtype)
        return codes

    def _bias(self, p: Pending) -> Tensor | None:
        return _to_float(p.inputs[2]).float() if len(p.inputs) > 2 and p.inputs[2] is not None else None

    def _conv(self, p: Pending, scale: float, zp: int, dtype: torch.dtype) -> Tensor:
        x, w = p.inputs[0], p.inputs[1]
        if not isinstance(x, Deq) or not isinstance(w, Weight) or w.codes.dim() != 4:
            raise Unsupported("a 2-D convolution of quantized activations by constant quantized weights")
        a = attrs(p.node)
        padding, explicit = conv_padding(a, 2)
        qx = x.qtensor()
        if explicit:  # pad the codes with the zero point (the real value 0)
            qx = torch._make_per_tensor_quantized_tensor(pad_tensor(qx.int_repr(), torch.tensor(
                [explicit[2], explicit[0], explicit[3], explicit[1]]), qx.q_zero_point(), "constant"),
                qx.q_scale(), qx.q_zero_point())
        key = p.node.output[0]
        if key not in self.packed:
            self.packed[key] = torch.ops.quantized.conv2d_prepack(
                w.qtensor(), self._bias(p), list(a.get("strides", [1, 1])), padding, list(a.get("dilations", [1, 1])),
                int(a.get("group", 1)))
        fn = torch.ops.quantized.conv2d_relu if _relu_first(p) else torch.ops.quantized.conv2d
        return fn(qx, self.packed[key], *_out_qparams(scale, zp, dtype))

    def _linear(self, p: Pending, scale: float, zp: int, dtype: torch.dtype) -> Tensor:
        x, w = p.inputs[0], p.inputs[1]
        a = attrs(p.node)
        transpose = p.node.op_type == "MatMul" or not a.get("transB", 0)
        if not isinstance(x, Deq) or not isinstance(w, Weight) or w.codes.dim() != 2 or a.get("transA", 0) \
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
            raise Unsupported("a matrix product of quantized activations by constant quantized weights")
        key = p.node.output[0]
        if key not in self.packed:
            self.packed[key] = torch.ops.quantized.linear_prepack(w.qtensor(transpose), self._bias(p))
        fn = torch.ops.quantized.linear_relu if _relu_first(p) else torch.ops.quantized.linear
        return fn(x.qtensor(), self.packed[key], *_out_qparams(scale, zp, dtype))

    def _add(self, p: Pending, scale: float, zp: int, dtype: torch.dtype) -> Tensor:
        xa, xb = p.inputs
        if not isinstance(xa, Deq) or not isinstance(xb, Deq) or xa.codes.shape != xb.codes.shape:
            raise Unsupported("an addition of two quantized tensors of one shape")
        fn = torch.ops.quantized.add_relu if _relu_first(p) else torch.ops.quantized.add
        return fn(xa.qtensor(), xb.qtensor(), *_out_qparams(scale, zp, dtype))

    def _pool(self, p: Pending, scale: float, zp: int, dtype: torch.dtype) -> Tensor:
        x = p.inputs[0]
        if not isinstance(x, Deq) or x.codes.dim() != 4:
            raise Unsupported("a global average pool of quantized activations")
        y = F.adaptive_avg_pool2d(x.qtensor(), 1)  # the engine's kernel keeps the input's scale and zero point
        s, z = _out_qparams(scale, zp, dtype)
        if (y.q_scale(), y.q_zero_point()) == (s, z):
            return y
        return torch.quantize_per_tensor(y.dequantize(), s, z, torch.quint8)  # the requantization convert_fx adds


# ---- the interpreter ------------------------------------------------------------------------------------------------

@dataclass
class Record:
    """What one pass ran: integer kernels per ONNX op, float ops with reasons, every op."""

    integer: Counter[str] = field(default_factory=Counter)
    floats: list[dict[str, str]] = field(default_factory=list)
    every: Counter[str] = field(default_factory=Counter)

    def report(self) -> OpReport:
        return OpReport(dict(sorted(self.integer.items())), self.floats, dict(sorted(self.every.items())))


FLOAT_COMPUTE = frozenset({"Conv", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "GlobalAveragePool", "AveragePool",
                           "Sigmoid", "HardSigmoid", "HardSwish", "Softmax", "ReduceMean", "Tanh", "Erf", "Clip",
                           "Relu", "Concat"})


class QDQInterpreter:
    """An exported QDQ ONNX model (constant-folded) run on PyTorch's quantized kernels of the current engine."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.input = g.input[0].name
        self.outputs = [o.name for o in g.output]
        self.consts: dict[str, Any] = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in g.initializer}
        for n in self.nodes:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs(n)["value"]).copy())
        self.kernels = Kernels()

    def run(self, x: Tensor, record: Record | None = None) -> list[Tensor]:
        env: dict[str, Any] = dict(self.consts)
        env[self.input] = x
        rec = record if record is not None else Record()
        for node in self.nodes:
            if node.op_type == "Constant":
                continue
            rec.every[node.op_type] += 1
            ins = [env.get(i) if i else None for i in node.input]
            env[node.output[0]] = self._step(node, ins, rec)
        return [self._materialize(env[o], rec).float() if not isinstance(env[o], Codes) else env[o].t
                for o in self.outputs]

    def _step(self, node: onnx.NodeProto, ins: list[Any], rec: Record) -> Any:
        op = node.op_type
        if op == "DequantizeLinear":
            return self._dequantize(node, ins)
        if op == "QuantizeLinear":
            return self._quantize(node, ins, rec)
        x = ins[0]
        if op in MOVEMENT_OPS and isinstance(x, (Codes, Deq)) and all(not isinstance(v, (Codes, Deq, Pending))
                                                                      for v in ins[1:]):
            rest = list(ins[1:])
            if op == "Pad":
                rest = [rest[0], self._pad_code(node, x, ins)]
            if isinstance(x, Codes):
                return Codes(move(node, x.t, rest))
            return Deq(move(node, x.codes, rest), x.scale, x.zp)
        if op in ("Relu", "Clip") and isinstance(x, Deq):
            bounds = RELU if op == "Relu" else self._clip_bounds(node, ins)
            on_grid = _grid_codes(bounds, x)
            if on_grid is not None:  # clamping values on the grid at grid points: exact on the codes
                return Deq(x.codes.to(torch.int32).clamp(*on_grid).to(x.codes.dtype), x.scale, x.zp)
        if op in ("Relu", "Clip") and isinstance(x, Pending):
            if op == "Relu":
                return x.clamped(*RELU)
            return x.clamped(*self._clip_bounds(node, ins))
        if op in QUANTIZED_OPS and all(isinstance(v, (Deq, Weight)) or v is None for v in ins[:2]) \
                and any(isinstance(v, Deq) for v in ins) and not any(isinstance(v, Pending) for v in ins):
            return Pending(node, ins)
        return self._float(node, ins, rec, "its inputs are not all quantized, so it runs in float as exported")

    @staticmethod
    def _clip_bounds(node: onnx.NodeProto, ins: list[Any]) -> tuple[float, float]:
        lo = scalar(ins[1]) if len(ins) > 1 and ins[1] is not None else attrs(node).get("min", -math.inf)
        hi = scalar(ins[2]) if len(ins) > 2 and ins[2] is not None else attrs(node).get("max", math.inf)
        return lo, hi

    def _pad_code(self, node: onnx.NodeProto, x: Codes | Deq, ins: list[Any]) -> Any:
        """A Pad's constant value as a code: given for codes; for dequantized values, 0.0 is the zero point."""
        value = ins[2] if len(ins) > 2 else None
        if isinstance(x, Codes):
            return value
        v = 0.0 if value is None else scalar(value)
        if v != 0.0:
            raise RuntimeUnavailableError(f"Pad {node.name!r} pads dequantized values with {v}, not 0")
        return torch.tensor(x.zp)

    def _dequantize(self, node: onnx.NodeProto, ins: list[Any]) -> Any:
        q, s = ins[0], ins[1]
        zp = ins[2] if len(ins) > 2 and ins[2] is not None else torch.zeros((), dtype=torch.uint8)
        name = node.input[0]
        if name in self.consts:
            axis = attrs(node).get("axis", 1) if s.numel() > 1 else None
            return Weight(q, s.float(), zp, axis % q.dim() if axis is not None else None)
        if isinstance(q, Codes):
            if s.numel() != 1:
                raise RuntimeUnavailableError(f"{node.name!r}: activations quantized per channel are not supported")
            return Deq(q.t, float(s), int(zp))
        raise RuntimeUnavailableError(f"{node.name!r}: DequantizeLinear of a non-integer value")

    def _quantize(self, node: onnx.NodeProto, ins: list[Any], rec: Record) -> Codes:
        x, s = ins[0], ins[1]
        zp_t = ins[2] if len(ins) > 2 and ins[2] is not None else torch.zeros((), dtype=torch.uint8)
        if s.numel() != 1:
            raise RuntimeUnavailableError(f"{node.name!r}: per-channel QuantizeLinear of activations is not supported")
        scale, zp, dtype = float(s), int(zp_t), zp_t.dtype
        if isinstance(x, Pending):
            try:
                codes = self.kernels.run(x, scale, zp, dtype)
            except Unsupported as why:
                x = self._float(x.node, x.inputs, rec, f"no integer kernel: the engine needs {why}", x.act)
            else:
                rec.integer[x.node.op_type] += 1
                return Codes(codes)
        if isinstance(x, Deq) and (x.scale, x.zp, x.codes.dtype) == (scale, zp, dtype):
            return Codes(x.codes)
        s_, z_ = _out_qparams(scale, zp, dtype)
        y = torch.quantize_per_tensor(_to_float(x).float().contiguous(), s_, z_, torch.quint8)
        return Codes(_back(y, dtype))

    def _materialize(self, v: Any, rec: Record) -> Any:
        if isinstance(v, Pending):
            return self._float(v.node, v.inputs, rec, "its output is not quantized in the export (no QuantizeLinear "
                                                      "follows), so it runs in float on dequantized inputs", v.act)
        return v

    def _float(self, node: onnx.NodeProto, ins: list[Any], rec: Record, reason: str,
               act: tuple[float, float] | None = None) -> Tensor:
        xs = [None if v is None else _to_float(self._materialize(v, rec)) for v in ins]
        if any(isinstance(v, Codes) for v in xs):
            raise RuntimeUnavailableError(f"{node.name!r} ({node.op_type}) reads integer codes without a "
                                          "DequantizeLinear; the export is not a QDQ model")
        y = float_op(node, xs)
        if node.op_type in FLOAT_COMPUTE:
            rec.floats.append({"op": node.op_type, "node": node.name or node.output[0], "reason": reason})
        if act is not None:
            y = y.clamp(act[0], act[1])
            rec.floats.append({"op": "Relu" if act == RELU else "Clip", "node": node.name or node.output[0],
                               "reason": reason})
        return y

