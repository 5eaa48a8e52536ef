"""ExecuTorch with the XNNPACK delegate (``pip install 'quantbench[executorch]'``): the mobile-style int8 path, the
closest runnable relative of the ``acl`` / ``snpe`` kernels.

The exported QDQ ONNX (constant-folded) is rebuilt as a ``torch.fx`` module in PyTorch's PT2E representation:
``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` around float ``conv2d`` / ``linear`` /
``add`` / ``mean``, weights as int8 constants behind ``dequantize_per_channel`` (the form ``convert_pt2e``
produces), with the export's own scales and zero points. ``torch.export``, ExecuTorch's
``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` and its runtime then run it: XNNPACK turns each
DQ -> op -> Q pattern into a signed-int8 (QS8) kernel. XNNPACK takes signed activations only, so uint8 tensors
are rebuilt as int8 with codes and zero points - 128 (the same real values and saturation). Programs are static:
one is built per input shape.

Which ops ran in int8 is read from the lowered program: a conv / linear / add / mean inside an XNNPACK delegate
whose inputs are dequantized ran as a QS8 kernel; one outside the delegates, or with float inputs, ran in float.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from quantbench.deploy.errors import RuntimeUnavailableError
from quantbench.deploy.runtimes.base import OpReport, Runtime, RuntimeOptions, register_runtime, requires
from quantbench.deploy.runtimes.onnx_ops import attrs, input_shape

INSTALL = "pip install 'quantbench[executorch]'"
MODULES = ("executorch.runtime", "executorch.exir", "executorch.backends.xnnpack.partition.xnnpack_partitioner",
           "executorch.kernels.quantized")
NOT_DELEGATED = ("ConstantPadConfig",)
FP32_REASON = ("XNNPACK ran it in fp32: the adapter gives it float weights where no QS8 kernel applies (asymmetric "
               "weights: QS8 takes zero point 0; or an output that is not re-quantized)")
COMPUTE_TARGETS = ("convolution", "linear", "addmm", "mm", "add.Tensor", "mean", "avg_pool2d", "mul.Tensor")


def _s8(zero_point: int, dtype: np.dtype) -> int:
    """A zero point of ``dtype`` codes in the signed-int8 domain the module uses."""
    return zero_point - 128 if dtype == np.uint8 else zero_point


@dataclass
class _Builder:
    """ONNX (QDQ, constant-folded) -> ``torch.fx.GraphModule`` of PT2E quantize / dequantize ops."""

    model: onnx.ModelProto
    root: nn.Module = field(default_factory=nn.Module)
    requantized: set[str] = field(default_factory=set)
    clips: dict[str, tuple[fx.Node, tuple[float, float]]] = field(default_factory=dict)
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    readers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)

    def only_quantized(self, name: str) -> bool:
        """Whether every reader of ``name`` is a QuantizeLinear, directly or through more Clips."""
        rs = self.readers.get(name, [])
        return bool(rs) and all(r.op_type == "QuantizeLinear" or (r.op_type == "Clip" and r.input[0] == name
                                                                    and self.only_quantized(r.output[0])) for r in rs)
    graph: fx.Graph = field(default_factory=fx.Graph)
    env: dict[str, fx.Node] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)

    def const(self, name: str, value: torch.Tensor) -> fx.Node:
        attr = f"c{len(self.root._buffers)}"
        self.root.register_buffer(attr, value)
        return self.graph.get_attr(attr)

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def build(self) -> fx.GraphModule:
        qd = torch.ops.quantized_decomposed
        g = self.model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                self.consts[n.output[0]] = numpy_helper.to_array(attrs(n)["value"])
        self.env[g.input[0].name] = self.graph.placeholder("x")
        self.requantized = _requantized_outputs(g)
        for n in g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        for node in g.node:
            if node.op_type != "Constant":
                self.env[node.output[0]] = self.node(node, qd)
        self.graph.output(self.env[g.output[0].name])
        return fx.GraphModule(self.root, self.graph)

    @property
    def float_weights(self) -> set[str]:
        """Weight DequantizeLinear outputs read by a conv / linear whose output is not re-quantized."""
        if not hasattr(self, "_float_weights"):
            self._float_weights = {i for n in self.model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                                   and n.output[0] not in self.requantized for i in n.input[1:]}
        return self._float_weights

    def tensor(self, name: str) -> fx.Node:
        """The value ``name``: a node computed earlier, or a float constant (a float model's weights)."""
        if name not in self.env:
            self.env[name] = self.const(name, torch.from_numpy(np.array(self.value(name), copy=True)))
        return self.env[name]

    def value(self, name: str) -> np.ndarray:
        if name not in self.consts:
            raise RuntimeUnavailableError(f"the ExecuTorch adapter needs {name!r} to be a constant")
        return self.consts[name]

    def node(self, node: onnx.NodeProto, qd: Any) -> fx.Node:
        op, ins, a = node.op_type, list(node.input), attrs(node)
        x = self.env.get(ins[0]) if ins else None
        if op == "QuantizeLinear":
            s, zp = float(self.value(ins[1])), self.value(ins[2])
            z = _s8(int(zp), zp.dtype)
            qlo, qhi = -128, 127
            if ins[0] in self.clips:  # a Clip the quantizer absorbs: its bounds as the code range
                x, (lo, hi) = self.clips[ins[0]]
                qlo = -128 if math.isinf(lo) else max(-128, z + round(lo / s))
                qhi = 127 if math.isinf(hi) else min(127, z + round(hi / s))
            node_out = self.call(qd.quantize_per_tensor, x, s, z, qlo, qhi, torch.int8)
            self.ranges[node.output[0]] = (qlo, qhi)
            return node_out
        if op == "DequantizeLinear":
            return self.dequantize(ins, a, qd, node.output[0] in self.float_weights)
        if op == "Conv":
            pads = a.get("pads", [0, 0, 0, 0])
            if pads[:2] != pads[2:]:
                x = self.call(F.pad, x, [pads[1], pads[3], pads[0], pads[2]])
                pads = [0, 0, 0, 0]
            bias = self.tensor(ins[2]) if len(ins) > 2 and ins[2] else None
            return self.call(F.conv2d, x, self.tensor(ins[1]), bias, list(a.get("strides", [1, 1])), list(pads[:2]),
                             list(a.get("dilations", [1, 1])), int(a.get("group", 1)))
        if op == "Gemm":
            if not a.get("transB") or a.get("transA") or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                raise RuntimeUnavailableError(f"Gemm {node.name!r}: only y = x W^T + b is supported")
            return self.call(F.linear, x, self.tensor(ins[1]), self.tensor(ins[2]) if len(ins) > 2 else None)
        if op == "MatMul":
            return self.call(torch.matmul, x, self.tensor(ins[1]))
        if op in ("Add", "Mul", "Sub"):
            fn = {"Add": operator.add, "Mul": operator.mul, "Sub": operator.sub}[op]
            other = self.value(ins[1]) if ins[1] not in self.env else None
            return self.call(fn, x, float(other) if other is not None and other.size == 1 else self.tensor(ins[1]))
        if op == "Relu":
            return self.call(torch.relu, x)
        if op == "Clip":
            lo = float(self.value(ins[1])) if len(ins) > 1 and ins[1] else a.get("min", -math.inf)
            hi = float(self.value(ins[2])) if len(ins) > 2 and ins[2] else a.get("max", math.inf)
            if self.only_quantized(node.output[0]):
                # Clip(s) -> QuantizeLinear (a narrow range, ReLU6): quantize_per_tensor's quant_min / quant_max
                # clamp the codes exactly (XNNPACK has no fused clamp-then-quantize pattern otherwise)
                if ins[0] in self.clips:  # a chain of clips: one range
                    x, (lo0, hi0) = self.clips[ins[0]]
                    lo, hi = max(lo, lo0), min(hi, hi0)
                self.clips[node.output[0]] = (x, (lo, hi))
                return x
            return self.call(torch.clamp, x, lo, hi)
        if op == "GlobalAveragePool":
            return self.call(torch.mean, x, [2, 3], True)
        if op == "Flatten":
            return self.call(torch.flatten, x, int(a.get("axis", 1)))
        if op == "Slice":
            return self.slice(x, ins)
        if op == "Pad":
            return self.pad(x, ins, a)
        if op == "MaxPool":
            k = list(a["kernel_shape"])
            return self.call(F.max_pool2d, x, k, list(a.get("strides", k)), list(a.get("pads", [0] * 4)[:2]))
        if op in ("Sigmoid", "Tanh", "HardSwish"):
            return self.call({"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "HardSwish": F.hardswish}[op], x)
        if op == "Concat":
            return self.call(torch.cat, [self.tensor(i) for i in ins], int(a["axis"]))
        raise RuntimeUnavailableError(f"the ExecuTorch adapter has no translation of ONNX op {op!r} "
                                      f"(node {node.name!r}); run this model with --runtime onnxruntime")

    def dequantize(self, ins: list[str], a: dict[str, Any], qd: Any, as_float: bool = False) -> fx.Node:
        s = self.value(ins[1]).astype(np.float32)
        zp = self.value(ins[2]) if len(ins) > 2 and ins[2] else np.zeros_like(s, dtype=np.uint8)
        if ins[0] not in self.consts:  # runtime codes (signed-int8 domain)
            qlo, qhi = self.ranges.get(ins[0], (-128, 127))
            return self.call(qd.dequantize_per_tensor, self.env[ins[0]], float(s), _s8(int(zp), zp.dtype),
                             qlo, qhi, torch.int8)
        codes = self.consts[ins[0]]
        if codes.dtype == np.int32:  # an int32 bias: the float bias XNNPACK re-quantizes to exactly these codes
            axis_s = s.reshape(-1) if s.size > 1 else s
            return self.const(ins[0], torch.from_numpy(((codes.astype(np.float64) - zp.astype(np.float64))
                                                         * axis_s.astype(np.float64)).astype(np.float32)))
        q = torch.from_numpy(codes.astype(np.int16) - (128 if codes.dtype == np.uint8 else 0)).to(torch.int8)
        zs = torch.from_numpy(np.asarray(zp.astype(np.int64) - (128 if zp.dtype == np.uint8 else 0)))
        # XNNPACK's QS8 kernels take symmetric weights only, and an op whose output is not re-quantized is no QS8
        # kernel: give XNNPACK float weights there (it runs that op in fp32)
        if as_float or bool((zs != 0).any()):
            shape = [-1] + [1] * (codes.ndim - 1) if s.size > 1 else []
            w = (q.double() - zs.double().reshape(shape)) * torch.from_numpy(s.astype(np.float64)).reshape(shape)
            return self.const(ins[0], w.float())
        if s.size == 1:
            return self.call(qd.dequantize_per_tensor, self.const(ins[0], q), float(s), int(zs), -128, 127,
                             torch.int8)
        axis = int(a.get("axis", 1)) % codes.ndim
        return self.call(qd.dequantize_per_channel, self.const(ins[0], q),
                         self.const(ins[1], torch.from_numpy(s)), self.const(ins[2], zs), axis, -128, 127, torch.int8)

    def slice(self, x: fx.Node, ins: list[str]) -> fx.Node:
        starts, ends = self.value(ins[1]).tolist(), self.value(ins[2]).tolist()
        axes = self.value(ins[3]).tolist() if len(ins) > 3 and ins[3] else list(range(len(starts)))
        steps = self.value(ins[4]).tolist() if len(ins) > 4 and ins[4] else [1] * len(starts)
        index: list[Any] = [slice(None)] * (max(axes) + 1)
        for ax, st, en, sp in zip(axes, starts, ends, steps, strict=True):
            index[ax] = slice(st, None if en >= 2**62 else en, sp)
        return self.call(operator.getitem, x, tuple(index))

    def pad(self, x: fx.Node, ins: list[str], a: dict[str, Any]) -> fx.Node:
        mode = a.get("mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            raise RuntimeUnavailableError("the ExecuTorch adapter pads with a constant only")
        p = self.value(ins[1]).tolist()
        half = len(p) // 2
        torch_pads: list[int] = []
        for axis in reversed(range(half)):
            torch_pads += [int(p[axis]), int(p[axis + half])]
        value = self.value(ins[2]) if len(ins) > 2 and ins[2] else np.zeros((), np.float32)
        v = float(value) - (128 if value.dtype == np.uint8 else 0)  # codes of a uint8 tensor live in int8 here
        return self.call(F.pad, x, torch_pads, "constant", v)


def _requantized_outputs(g: onnx.GraphProto) -> set[str]:
    """Tensors whose every reader is a QuantizeLinear, directly or through Relu / Clip."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def requantized(name: str) -> bool:
        rs = readers.get(name, [])
        return bool(rs) and name not in outputs and all(
            r.op_type == "QuantizeLinear" or (r.op_type in ("Relu", "Clip") and requantized(r.output[0])) for r in rs)

    return {n.output[0] for n in g.node if requantized(n.output[0])}


def report_from_lowered(gm: fx.GraphModule) -> OpReport:
    """Integer / float compute ops of a program lowered by the XNNPACK partitioner."""
    integer: Counter[str] = Counter()
    floats: list[dict[str, str]] = []
    every: Counter[str] = Counter()

    def kind(n: fx.Node) -> str | None:
        name = str(n.target)
        return next((k.split(".")[0] for k in COMPUTE_TARGETS if f"aten.{k}" in name or f"aten_{k}" in name), None)

    def dequantized(n: fx.Node) -> bool:  # the data inputs (and a conv's / linear's weight) are dequantized int8
        k = kind(n)
        data = n.args[:1] if k in ("mean", "avg_pool2d") else n.args[:2]
        return all(isinstance(a, fx.Node) and "dequantize" in str(a.target) for a in data)

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        k = kind(node)
        if k is not None:
            every[k] += 1
            floats.append({"op": k, "node": node.name, "reason": "not delegated to XNNPACK: ExecuTorch's portable "
                                                                  "float kernel ran it"})
    for name, sub in gm.named_children():
        original = getattr(sub, "original_module", None)
        if original is None or not name.startswith("lowered_module"):
            continue
        for node in original.graph_module.graph.nodes:
            k = kind(node) if node.op == "call_function" else None
            if k is None:
                continue
            every[k] += 1
            if dequantized(node):
                integer[k] += 1
            else:
                floats.append({"op": k, "node": node.name, "reason": FP32_REASON})
    return OpReport(dict(sorted(integer.items())), floats, dict(sorted(every.items())))


@dataclass
class _Method:
    """A loaded method with the program that owns its memory (the method dangles once the program is freed)."""

    program: Any
    method: Any

    def execute(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.method.execute(inputs)


@dataclass
class _Program:
    module: fx.GraphModule
    report: OpReport
    _methods: dict[tuple[int, ...], _Method]
    threads: int | None = None

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.threads:  # ExecuTorch's own thread pool (XNNPACK ignores torch's thread count)
            from executorch.extension.pybindings import portable_lib

            if portable_lib._threadpool_get_thread_count() != self.threads:
                portable_lib._unsafe_reset_threadpool(int(self.threads))
        shape = tuple(x.shape)
        if shape not in self._methods:
            self._methods[shape] = _lower(self.module, torch.zeros(shape))[0]
        return self._methods[shape].execute([torch.from_numpy(np.ascontiguousarray(x))])[0].numpy()


def _lower(module: fx.GraphModule, example: torch.Tensor) -> tuple[_Method, OpReport]:
    import executorch.kernels.quantized  # noqa: F401  (the out-variants of the quantize / dequantize ops)
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime as ETRuntime

    ep = torch.export.export(module, (example,))
    # XNNPACK's constant pad fails to compile on the ResNet shortcut's channel padding (xnn_status_invalid_parameter):
    # padding is data movement, left to ExecuTorch's portable kernel
    configs = [c for c in ALL_PARTITIONER_CONFIGS if c.__name__ not in NOT_DELEGATED]
    lowered = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner(configs=configs)])
    report = report_from_lowered(lowered.exported_program().graph_module)
    program = ETRuntime.get().load_program(lowered.to_executorch().buffer)
    return _Method(program, program.load_method("forward")), report


def build_module(model: onnx.ModelProto) -> fx.GraphModule:
    """The QDQ ONNX as a PT2E-style ``torch.fx`` module (signed-int8 activations)."""
    import executorch.kernels.quantized  # noqa: F401  (registers the quantized_decomposed ops and out-variants)

    return _Builder(model).build()


def _load(path: Path, opts: RuntimeOptions) -> _Program:
    from quantbench.deploy.ort import constant_folded

    model = constant_folded(path)
    module = build_module(model)
    shape = input_shape(model)
    method, report = _lower(module, torch.zeros(shape))
    return _Program(module, report, {shape: method}, opts.threads)


def _version() -> str:
    from importlib.metadata import version

    return version("executorch")


register_runtime(Runtime("executorch", "ExecuTorch with the XNNPACK delegate (QS8 kernels; signed-int8 activations)",
                         requires("ExecuTorch", INSTALL, *MODULES), _version, _load))
