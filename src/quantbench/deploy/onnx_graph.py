"""Post-processing of the exported ONNX graph: name the QDQ nodes after quantbench's quantizers, give
every node its own constant inputs, read constants back.

torch's exporter de-duplicates equal initializers (e.g. every all-zero zero-point becomes one tensor,
sometimes through an Identity node). ONNX Runtime's ``session.x64quantprecision`` mode then fails with
"Attempt to replace the existing tensor" when it converts int8 weights to uint8, so every use gets its
own copy here; the cost is a few bytes per quantizer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from quantbench.deploy.errors import ExportError
from quantbench.deploy.qdq import Emitted


class Graph:
    """Index of an ONNX graph: initializers, producers and consumers of every tensor."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self) -> None:
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, or Identity of either)."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Identity":
            return self.constant(node.input[0])
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def set_constant(self, node: onnx.NodeProto, index: int, name: str, value: np.ndarray) -> None:
        """Give input ``index`` of ``node`` its own initializer ``name`` holding ``value``."""
        if name in self.inits:
            raise ExportError(f"internal: initializer name {name!r} is taken")
        tensor = numpy_helper.from_array(np.asarray(value), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        node.input[index] = name

    def prune(self) -> None:
        """Drop nodes and initializers nothing uses any more (Identity / Constant left by renaming)."""
        changed = True
        outputs = {o.name for o in self.graph.output}
        while changed:
            self.refresh()
            used = {i for n in self.graph.node for i in n.input} | outputs
            keep = [n for n in self.graph.node
                    if n.op_type not in ("Identity", "Constant") or any(o in used for o in n.output)]
            changed = len(keep) != len(self.graph.node)
            if changed:
                del self.graph.node[:]
                self.graph.node.extend(keep)
        used = {i for n in self.graph.node for i in n.input} | outputs
        keep_inits = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep_inits)
        self.refresh()


def name_qdq_nodes(model: onnx.ModelProto, emitted: list[Emitted], expected: dict[str, dict]) -> dict[str, dict]:
    """Name QDQ nodes and their constants after the quantizers that emitted them.

    ``emitted`` is the order of the exporter's symbolic calls; ``expected`` maps each emitted name to the
    values it must carry (``scale``, ``zero_point`` for activations; ``codes`` for weights and biases), which
    are checked so a reordering by the exporter cannot mislabel a tensor. Returns, per quantizer, the ONNX
    tensor it quantizes and the names of its nodes.
    """
    g = Graph(model)
    acts = [e for e in emitted if e.kind == "activation"]
    consts = [e for e in emitted if e.kind != "activation"]
    q_nodes = [n for n in g.graph.node if n.op_type == "QuantizeLinear"]
    dq_const = [n for n in g.graph.node if n.op_type == "DequantizeLinear" and g.constant(n.input[0]) is not None]
    if len(q_nodes) != len(acts) or len(dq_const) != len(consts):
        raise ExportError(f"internal: the exporter emitted {len(q_nodes)} QuantizeLinear / {len(dq_const)} constant "
                          f"DequantizeLinear nodes for {len(acts)} activation quantizers and {len(consts)} "
                          "weights/biases")
    where: dict[str, dict] = {}
    for node, e in zip(q_nodes, acts, strict=True):
        exp = expected[e.name]
        scale, zp = g.constant(node.input[1]), g.constant(node.input[2])
        same = scale is not None and zp is not None and np.array_equal(scale, exp["scale"]) and np.array_equal(
            zp, exp["zero_point"])
        if not same:
            raise ExportError(f"internal: QuantizeLinear {node.name} does not carry the parameters of {e.name}")
        node.name = f"{e.name}/QuantizeLinear"
        g.set_constant(node, 1, f"{e.name}.scale", scale)
        g.set_constant(node, 2, f"{e.name}.zero_point", zp)
        tensor = node.input[0]
        clip = g.producer.get(tensor)
        if clip is not None and clip.op_type == "Clip" and exp.get("clip") is not None:
            clip.name = f"{e.name}/Clip"
            for k in (1, 2):
                g.set_constant(clip, k, f"{e.name}.clip_{'min' if k == 1 else 'max'}", g.constant(clip.input[k]))
            tensor = clip.input[0]
        dqs = g.consumers.get(node.output[0], [])
        for k, dq in enumerate(dqs):
            dq.name = f"{e.name}/DequantizeLinear" + (f"_{k}" if k else "")
            g.set_constant(dq, 1, f"{e.name}.scale_dq{k}", scale)
            g.set_constant(dq, 2, f"{e.name}.zero_point_dq{k}", zp)
        where[e.name] = {"tensor": tensor, "quantize": node.name, "dequantize": [d.name for d in dqs],
                         "output": node.output[0]}
    for node, e in zip(dq_const, consts, strict=True):
        exp = expected[f"{e.name}.{e.kind}"]
        codes = g.constant(node.input[0])
        if codes is None or not np.array_equal(codes, exp["codes"]):
            raise ExportError(f"internal: DequantizeLinear {node.name} does not carry the {e.kind} of {e.name}")
        node.name = f"{e.name}/{e.kind}/DequantizeLinear"
        g.set_constant(node, 0, f"{e.name}.{e.kind}_quantized", codes)
        g.set_constant(node, 1, f"{e.name}.{e.kind}_scale", g.constant(node.input[1]))
        g.set_constant(node, 2, f"{e.name}.{e.kind}_zero_point", g.constant(node.input[2]))
        where[f"{e.name}.{e.kind}"] = {"tensor": f"{e.name}.{e.kind}_quantized", "dequantize": [node.name],
                                       "output": node.output[0]}
    g.prune()
    unshare_constants(g)
    return where


def unshare_constants(g: Graph) -> None:
    """Give every use of a shared initializer its own copy (see the module docstring)."""
    uses = Counter(i for n in g.graph.node for i in n.input if i in g.inits)
    seen: Counter = Counter()
    for n in g.graph.node:
        for k, name in enumerate(n.input):
            if uses.get(name, 0) > 1:
                seen[name] += 1
                if seen[name] > 1:
                    g.set_constant(n, k, f"{name}__{seen[name] - 1}", numpy_helper.to_array(g.inits[name]))
    g.refresh()


def op_counts(nodes: Iterable[onnx.NodeProto]) -> dict[str, int]:
    """Op types (``domain:op`` outside the default domain) and how often they occur."""
    c = Counter(f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in nodes)
    return dict(sorted(c.items()))
