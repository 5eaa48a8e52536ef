"""Insert activation quantizers where the backend spec says (seed 001 E and G, seed 004 Fig. 1).

``inputs`` mode (academic, ACL): the input of every conv/linear is quantized, nothing else.
``outputs`` mode (TensorRT, SNPE, TVM, FBGEMM, ONNX Runtime): the output of every compute op is
re-quantized, fused with a following activation (and BN when it is not folded); the inputs of a
concat share one quantizer, so the concat output is on that grid too; the model's final output
(the logits) stays in float. In both modes a conv/linear whose input is not already quantized gets
an input quantizer, one per producing tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from quantbench.backends.spec import BackendSpec
from quantbench.graph.linking import link_integer_arithmetic
from quantbench.graph.ops import OpKind, is_tensor_node, op_kind, tensor_inputs
from quantbench.quant.quantizer import Quantizer

REQUANT_KINDS = (OpKind.WEIGHTED, OpKind.ADD, OpKind.POOL, OpKind.BN, OpKind.OTHER, OpKind.ACT)


@dataclass
class Site:
    """One activation quantizer: what it quantizes and who consumes it."""

    name: str
    role: str  # "input" | "output" | "concat"
    producers: list[str]
    consumers: list[str] = field(default_factory=list)


class _Placer:
    def __init__(self, gm: fx.GraphModule, spec: BackendSpec,
                 make_quantizer: Callable[[str, set[str]], Quantizer | None]) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.spec = spec
        self.p = spec.placement
        self.make_quantizer = make_quantizer
        self.modules = dict(gm.named_modules())
        self.kind = {n: op_kind(n, self.modules) for n in self.graph.nodes}
        self.quantized: set[fx.Node] = set()
        self.fused: set[fx.Node] = set()
        self.sites: list[Site] = []

    # -- graph helpers -------------------------------------------------------------------------
    def _source(self, n: fx.Node) -> fx.Node:
        """Walk back through value-preserving ops (reshape, pad, getitem...)."""
        while self.kind.get(n) is OpKind.PASS:
            ins = tensor_inputs(n)
            if not ins:
                break
            n = ins[0]
        return n

    def _consumers(self, n: fx.Node) -> set[fx.Node]:
        """Non-pass-through nodes reached from ``n`` through pass-through ops."""
        out: set[fx.Node] = set()
        stack = list(n.users)
        while stack:
            u = stack.pop()
            if self.kind.get(u) is OpKind.PASS:
                stack.extend(u.users)
            else:
                out.add(u)
        return out

    def _fuse_end(self, n: fx.Node) -> fx.Node:
        """Last node of the group n -> [BN] -> [activation] (each the previous one's only user)."""
        follow = (OpKind.BN, OpKind.ACT) if self.kind[n] is OpKind.WEIGHTED else (OpKind.ACT,)
        while len(n.users) == 1:
            u = next(iter(n.users))
            k = self.kind.get(u)
            if k not in follow:
                break
            self.fused.add(u)
            n = u
            follow = (OpKind.ACT,)
        return n

    def _call(self, target: str, producer: fx.Node) -> fx.Node:
        with self.graph.inserting_after(producer):
            qnode = self.graph.call_module(target, (producer,))
        qnode.meta = {k: v for k, v in producer.meta.items() if k == "tensor_meta"}
        return qnode

    @staticmethod
    def _where(n: fx.Node) -> str:
        return str(n.target) if n.op in ("call_module", "placeholder") else n.name

    def _insert(self, name: str, role: str, producer: fx.Node, users: list[fx.Node],
                module: Quantizer, where: str = "") -> fx.Node:
        qname = f"qb_act.{name}"
        if not hasattr(self.gm, "qb_act"):
            self.gm.add_module("qb_act", nn.Module())
        self.gm.get_submodule("qb_act").add_module(name, module)
        module.set_name(name, where)
        qnode = self._call(qname, producer)
        for u in users:
            u.replace_input_with(producer, qnode)
        self.kind[qnode] = OpKind.NONE
        self.quantized.add(qnode)
        return qnode

    # -- placement -----------------------------------------------------------------------------
    def run(self) -> list[Site]:
        for n in list(self.graph.nodes):
            k = self.kind.get(n, OpKind.NONE)
            if self.p.mode == "outputs":
                if k is OpKind.CAT and self.p.concat_shared:
                    self._place_concat(n)
                elif k in REQUANT_KINDS and n not in self.fused:
                    if self._requantizes(k):
                        self._place_output(n)
                    else:
                        self._fuse_end(n)  # its fused activation stays in float with it
            if k is OpKind.WEIGHTED or (k is OpKind.ADD and self.p.mode == "outputs" and self.p.add_inputs):
                self._place_inputs(n)
        self.graph.lint()
        self.gm.recompile()
        return self.sites

    def _requantizes(self, k: OpKind) -> bool:
        return {
            OpKind.WEIGHTED: True,
            OpKind.ADD: self.p.add_output,
            OpKind.POOL: self.p.pool,
            OpKind.BN: self.p.other_ops,
            OpKind.OTHER: self.p.other_ops,
            OpKind.ACT: self.p.other_ops,
        }[k]

    def _place_output(self, n: fx.Node) -> None:
        end = self._fuse_end(n)
        if not is_tensor_node(end):
            return
        users = list(end.users)
        consumers = self._consumers(end)
        if any(u.op == "output" for u in consumers):
            return  # the logits stay in float
        ckinds = {self.kind.get(c) for c in consumers}
        if self.p.concat_shared and ckinds == {OpKind.CAT}:
            return  # the concat's shared quantizer quantizes this tensor
        if not self.p.add_inputs and ckinds == {OpKind.ADD}:
            return  # skip policy: the branch enters the add in full precision
        name = f"{n.name}_post"
        q = self.make_quantizer(name, {c.name for c in consumers})
        if q is None:
            return
        fused = f" (+{end.name})" if end is not n else ""
        self._insert(name, "output", end, users, q, f"output of {self._where(n)}{fused}")
        self.sites.append(Site(name, "output", [n.name], sorted(c.name for c in consumers)))

    def _place_concat(self, n: fx.Node) -> None:
        ins = tensor_inputs(n)
        q = self.make_quantizer(f"{n.name}_in", {c.name for c in self._consumers(n)})
        if q is None:
            return
        name = f"{n.name}_in"
        first = True
        for a in ins:
            if first:
                qnode = self._insert(name, "concat", a, [n], q, f"shared input of concat {n.name}")
                first = False
            else:
                qnode = self._call(f"qb_act.{name}", a)
                n.replace_input_with(a, qnode)
                self.kind[qnode] = OpKind.NONE
                self.quantized.add(qnode)
        self.quantized.add(n)
        self.sites.append(Site(name, "concat", [a.name for a in ins], [n.name]))

    def _place_inputs(self, n: fx.Node) -> None:
        ins = tensor_inputs(n)
        if self.kind[n] is OpKind.WEIGHTED:
            ins = ins[:1]
        for a in ins:
            src = self._source(a)
            if src in self.quantized:
                continue
            # one quantizer per producing tensor, right after it, shared by every consumer (reached
            # through pass-through ops) that needs a quantized input; other consumers keep the float
            users, consumers = [], set()
            for u in src.users:
                reach = self._consumers(u) if self.kind.get(u) is OpKind.PASS else {u}
                needing = {c.name for c in reach if self._needs_quantized_input(c)}
                if needing:
                    users.append(u)
                    consumers |= needing
            q = self.make_quantizer(f"{src.name}_in", consumers)
            if q is None:
                continue
            where = f"{self._where(src)} entering {', '.join(sorted(consumers))}"
            self._insert(f"{src.name}_in", "input", src, users, q, where)
            self.sites.append(Site(f"{src.name}_in", "input", [src.name], sorted(consumers)))

    def _needs_quantized_input(self, u: fx.Node) -> bool:
        k = self.kind.get(u)
        if k is OpKind.WEIGHTED:
            return True
        return k is OpKind.ADD and self.p.mode == "outputs" and self.p.add_inputs


def place_activation_quantizers(
    gm: fx.GraphModule, spec: BackendSpec, make_quantizer: Callable[[str, set[str]], Quantizer | None]
) -> list[Site]:
    """Insert activation quantizers into ``gm`` in place; returns where they went.

    ``make_quantizer(name, consumer_node_names)`` builds the quantizer for a site (or returns
    None to leave that tensor in float, e.g. when every consumer is a layer kept in FP). Backends
    simulated with ONNX Runtime's arithmetic then get their layers, adds and global pools wired to
    their quantizers (:func:`quantbench.graph.linking.link_integer_arithmetic`).
    """
    sites = _Placer(gm, spec, make_quantizer).run()
    if spec.arithmetic != "fake_quant":
        link_integer_arithmetic(gm, spec.arithmetic)
    return sites
