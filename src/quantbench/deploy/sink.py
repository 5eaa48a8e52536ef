"""Run value-preserving ops on the uint8 codes instead of dequantized floats.

After lowering, an input that reaches an integer op through Slice / Pad / Flatten (ResNet option-A
shortcuts, the classifier's Flatten) reads ``DequantizeLinear -> Slice -> Pad -> QuantizeLinear ->
DequantizeLinear -> op``, the re-quantizing copy carrying the same scale and zero-point as the first
DequantizeLinear (``__regrid_`` copies in :mod:`quantbench.deploy.lower`). ONNX Runtime propagates QDQ
through neither Pad nor Flatten, so it would run that chain in float32 and quantize again. Here the chain
is moved before the DequantizeLinear: ``x_q -> Slice -> Pad(value = z) -> DequantizeLinear -> op``.

This is exact: slicing, flattening and reshaping move codes unchanged, a constant pad of 0.0 is a pad of
the zero-point code, and QuantizeLinear(DequantizeLinear(q)) = q for the same scale and zero-point. It
touches uint8 tensors only: ONNX Runtime turns int8 QDQ pairs into uint8 (``QDQS8ToU8Transformer``) only
where a QuantizeLinear feeds a DequantizeLinear, so a chain of int8 codes would leave its reader mixing the
two types, in float.
"""

from __future__ import annotations

import numpy as np
import onnx

from quantbench.deploy.onnx_graph import Graph

#: ops whose output holds exactly the values of their (first) input, rearranged
VALUE_PRESERVING = frozenset({"Slice", "Pad", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})


def _attr(node: onnx.NodeProto, name: str, default: str) -> str:
    for a in node.attribute:
        if a.name == name:
            return a.s.decode()
    return default


def _pads_zero(g: Graph, node: onnx.NodeProto) -> bool:
    """A constant-mode Pad whose fill value is 0.0 (or absent, which means 0)."""
    if node.op_type != "Pad":
        return True
    if _attr(node, "mode", "constant") != "constant":
        return False
    if len(node.input) < 3 or not node.input[2]:
        return True
    value = g.constant(node.input[2])
    return value is not None and value.size == 1 and float(value.reshape(())) == 0.0


def _same_params(g: Graph, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    """Per-tensor uint8 QDQ nodes with equal scale and zero-point."""
    sa, sb = g.constant(a.input[1]), g.constant(b.input[1])
    za = g.constant(a.input[2]) if len(a.input) > 2 else None
    zb = g.constant(b.input[2]) if len(b.input) > 2 else None
    if any(v is None for v in (sa, sb, za, zb)):
        return False
    assert sa is not None and sb is not None and za is not None and zb is not None
    return (sa.size == sb.size == za.size == zb.size == 1 and za.dtype == zb.dtype == np.uint8
            and np.array_equal(sa, sb) and np.array_equal(za, zb))


def _chain(g: Graph, q: onnx.NodeProto, outputs: set[str]) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The DequantizeLinear and value-preserving ops between it and QuantizeLinear ``q``, if they sink."""
    chain: list[onnx.NodeProto] = []
    node = g.producer.get(q.input[0])
    while node is not None and node.op_type in VALUE_PRESERVING:
        if len(g.consumers.get(node.output[0], [])) != 1 or node.output[0] in outputs or not _pads_zero(g, node):
            return None
        chain.insert(0, node)
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or not chain or not _same_params(g, node, q):
        return None
    return node, chain


def sink_dequantize(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Move value-preserving chains between matching uint8 QDQ nodes onto the codes (see the module doc).

    Returns, per removed QuantizeLinear node, the op types that now run on uint8 codes.
    """
    g = Graph(model)
    outputs = {o.name for o in model.graph.output}
    sunk: dict[str, list[str]] = {}
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        found = _chain(g, q, outputs)
        if found is None:
            continue
        dq, chain = found
        chain[0].input[0] = dq.input[0]
        for node in chain:
            if node.op_type == "Pad":
                fill = g.constant(dq.input[2])
                assert fill is not None
                while len(node.input) < 3:
                    node.input.append("")
                g.set_constant(node, 2, f"{q.name.rsplit('/', 1)[0]}.pad_value_{node.name.strip('/')}",
                               fill.reshape(()))
        for reader in g.consumers.get(q.output[0], []):
            for k, name in enumerate(reader.input):
                if name == q.output[0]:
                    reader.input[k] = chain[-1].output[0]
        model.graph.node.remove(q)
        g.refresh()
        if not g.consumers.get(dq.output[0]):
            model.graph.node.remove(dq)
        changed = {n.output[0] for n in chain}
        kept = [v for v in model.graph.value_info if v.name not in changed]  # their type is now uint8
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        g.refresh()
        sunk[q.name] = [n.op_type for n in chain]
    if sunk:
        g.prune()
    return sunk
