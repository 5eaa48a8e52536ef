"""Wire a prepared graph to ONNX Runtime's integer kernels: which quantizers feed and follow each conv,
linear, add and global pool (:class:`~quantbench.graph.requant.Links`), and which binary adds and global
pools become :class:`~quantbench.graph.requant.IntAdd` / :class:`~quantbench.graph.requant.IntGlobalAvgPool`.
The arithmetic itself is in :mod:`quantbench.graph.requant`."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from quantbench.graph.ops import OpKind, is_tensor_node, op_kind, tensor_inputs
from quantbench.graph.requant import Clamp, IntAdd, IntGlobalAvgPool, Links
from quantbench.quant.quantizer import Quantizer

ADD_TARGETS = (operator.add, operator.iadd, torch.add)
# modules and methods the ONNX exporter emits nothing for
_VANISHING_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout)
_VANISHING_METHODS = frozenset({"contiguous"})


def vanishes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` leaves no trace in the exported ONNX graph."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _VANISHING_MODULES)
    if node.op == "call_method":
        return str(node.target) in _VANISHING_METHODS
    return node.op == "call_function" and node.target is F.dropout


def clamp_of(node: fx.Node, modules: dict[str, nn.Module]) -> Clamp | None:
    """The :class:`Clamp` an activation node computes, or None if it is not a clamp."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        if isinstance(m, nn.ReLU6):
            return Clamp("clip", 0.0, 6.0)
        if isinstance(m, nn.ReLU):
            return Clamp("relu")
        if isinstance(m, nn.Hardtanh):
            return Clamp("clip", float(m.min_val), float(m.max_val))
        return None
    if (node.op == "call_function" and node.target in (F.relu, torch.relu)) or (
            node.op == "call_method" and node.target in ("relu", "relu_")):
        return Clamp("relu")
    if node.op == "call_function" and node.target is F.relu6:
        return Clamp("clip", 0.0, 6.0)
    if node.op == "call_function" and node.target is F.hardtanh:
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return Clamp("clip", float(lo), float(hi))
    return None


class _Linker:
    def __init__(self, gm: fx.GraphModule, arithmetic: str = "onnxruntime") -> None:
        self.gm = gm
        self.arithmetic = arithmetic
        self.modules = dict(gm.named_modules())

    def quantizer(self, n: fx.Node) -> Quantizer | None:
        if n.op == "call_module":
            m = self.modules.get(str(n.target))
            if isinstance(m, Quantizer):
                return m
        return None

    def source_quantizer(self, n: fx.Node) -> tuple[Quantizer | None, bool]:
        """The quantizer producing ``n`` (through value-preserving ops) and whether ops the export keeps
        lie in between (then the export re-quantizes the input right before its reader)."""
        regrid = False
        while self.quantizer(n) is None and op_kind(n, self.modules) is OpKind.PASS:
            ins = tensor_inputs(n)
            if not ins:
                break
            regrid = regrid or not vanishes(n, self.modules)
            n = ins[0]
        return self.quantizer(n), regrid

    def output_chain(self, n: fx.Node) -> tuple[Quantizer | None, list[Clamp]]:
        """Follow single users through clamp activations to a quantizer."""
        acts: list[Clamp] = []
        while len(n.users) == 1:
            u = next(iter(n.users))
            q = self.quantizer(u)
            if q is not None:
                return q, acts
            c = clamp_of(u, self.modules)
            if c is None:
                return None, acts
            acts.append(c)
            n = u
        return None, acts

    def links(self, node: fx.Node, inputs: list[fx.Node]) -> Links:
        srcs = [self.source_quantizer(a) for a in inputs]
        out_q, acts = self.output_chain(node)
        return Links([q for q, _ in srcs], [r for _, r in srcs], out_q, acts, self.arithmetic)

    def replace(self, node: fx.Node, module: nn.Module, args: tuple) -> None:
        if not hasattr(self.gm, "qb_int"):
            self.gm.add_module("qb_int", nn.Module())
        self.gm.get_submodule("qb_int").add_module(node.name, module)
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(f"qb_int.{node.name}", args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def onnx_readers(self, n: fx.Node) -> int:
        """How many ONNX nodes will read ``n`` (modules the exporter drops are looked through)."""
        count = 0
        for u in n.users:
            count += self.onnx_readers(u) if vanishes(u, self.modules) else 1
        return count

    def mark_int8_tensors(self) -> None:
        """Set ``ort_int8`` on int8 quantizers whose tensor ORT keeps in int8 (:func:`stays_int8`)."""
        for n in self.gm.graph.nodes:
            q = self.quantizer(n)
            if q is None or q.qmin >= 0:
                continue
            src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            fused_producer = (src is not None and op_kind(src, self.modules) in (OpKind.WEIGHTED, OpKind.ADD)) or (
                src is not None and op_kind(src, self.modules) is OpKind.POOL and self._is_global_avg_pool(src))
            if fused_producer and self.onnx_readers(n) > 1:
                q.ort_int8 = True

    def run(self) -> None:
        self.mark_int8_tensors()
        for node in list(self.gm.graph.nodes):
            kind = op_kind(node, self.modules)
            module = self.modules.get(str(node.target)) if node.op == "call_module" else None
            if kind is OpKind.WEIGHTED:
                module.links = self.links(node, tensor_inputs(node)[:1])
            elif kind is OpKind.ADD and self._is_binary_add(node):
                ins = tensor_inputs(node)
                links = self.links(node, ins)
                if links.out_q is not None and all(links.inputs):
                    self.replace(node, IntAdd(links), (node.args[0], node.args[1]))
            elif kind is OpKind.POOL and self._is_global_avg_pool(node):
                links = self.links(node, tensor_inputs(node)[:1])
                if links.out_q is not None and links.inputs[0] is not None:
                    self.replace(node, IntGlobalAvgPool(links), (tensor_inputs(node)[0],))
        self.gm.graph.lint()
        self.gm.recompile()

    @staticmethod
    def _is_binary_add(node: fx.Node) -> bool:
        target_ok = (node.op == "call_function" and node.target in ADD_TARGETS) or (
            node.op == "call_method" and node.target == "add")
        return (target_ok and len(node.args) == 2 and not node.kwargs
                and all(isinstance(a, fx.Node) and is_tensor_node(a) for a in node.args))

    def _is_global_avg_pool(self, node: fx.Node) -> bool:
        def is_one(v: object) -> bool:
            return v == 1 or v in ((1, 1), [1, 1])

        if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
            size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
            return is_one(size)
        if node.op == "call_module":
            m = self.modules[str(node.target)]
            return isinstance(m, nn.AdaptiveAvgPool2d) and is_one(m.output_size)
        return False


def link_integer_arithmetic(gm: fx.GraphModule, arithmetic: str = "onnxruntime") -> None:
    """Wire layers, adds and global pools to their quantizers and switch activation quantizers to
    QuantizeLinear's ``x / s`` (in place; called by placement for backends with integer arithmetic).
    ``arithmetic`` picks the add and pool kernels (:data:`quantbench.graph.requant.ADD_POOL_KERNELS`)."""
    for m in gm.modules():
        if isinstance(m, Quantizer) and not m.is_weight:
            m.onnx_rounding = True
    _Linker(gm, arithmetic).run()
