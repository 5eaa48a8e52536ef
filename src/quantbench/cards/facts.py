"""What a prepared model actually quantizes: schemes, operations, bit-widths and feature-map sizes.

Everything here is read from the fx graph and the quantizer modules that :func:`prepare` inserted for
the run's backend spec, never from hand-written tables.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantbench.graph.ops import OpKind, op_kind, tensor_inputs
from quantbench.graph.quantize import activation_quantizers, list_layers, weight_layers
from quantbench.quant.quantizer import Quantizer
from quantbench.report.size import FP_BITS, model_size

NA = "n/a"


@dataclass
class FeatureMap:
    """One activation tensor that a quantizer quantizes (per sample)."""

    quantizer: str
    numel: int
    bits: int

    @property
    def bytes(self) -> float:
        return self.numel * self.bits / 8


@dataclass
class Structure:
    """Facts about one prepared model, for the quantization card."""

    weight_schemes: list[dict[str, Any]] = field(default_factory=list)
    activation_schemes: list[dict[str, Any]] = field(default_factory=list)
    operations: dict[str, Any] = field(default_factory=dict)
    feature_maps: list[FeatureMap] = field(default_factory=list)
    weight_bits: dict[str, int | None] = field(default_factory=dict)  # layer -> bits (None: float)
    weight_numel: dict[str, int] = field(default_factory=dict)
    size_bytes: float = 0.0
    fp32_size_bytes: float = 0.0
    layers: list[dict[str, Any]] = field(default_factory=list)  # per conv/linear layer, after overrides


def _scheme_row(q: Quantizer) -> dict[str, Any]:
    s = q.scheme
    return {"name": q.name, "bits": s.bits, "symmetric": s.symmetric, "signedness": s.signedness,
            "granularity": s.granularity, "scale_type": s.scale_type, "narrow_range": s.narrow_range,
            "observer": q.observer_name, "describe": s.describe()}


@torch.no_grad()
def _feature_maps(gm: nn.Module, example: Tensor) -> list[FeatureMap]:
    """Run the prepared model once (quantizers idle) and record what each activation quantizer sees."""
    maps: list[FeatureMap] = []
    hooks = []
    for _, q in activation_quantizers(gm):
        def hook(mod: nn.Module, inputs: tuple[Tensor, ...], _out: Any, q: Quantizer = q) -> None:
            x = inputs[0]
            maps.append(FeatureMap(q.name, int(x[0].numel()), q.scheme.bits))
        hooks.append(q.register_forward_hook(hook))
    was = [(q, q.observing, q.quantizing) for _, q in activation_quantizers(gm)]
    try:
        for q, _, _ in was:
            q.observing = q.quantizing = False
        gm.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
        for q, obs, quant in was:
            q.observing, q.quantizing = obs, quant
    return maps


class _Graph:
    """Op kinds and quantizer nodes of a prepared graph."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.modules = dict(gm.named_modules())
        self.nodes = list(gm.graph.nodes)
        self.kind = {n: op_kind(n, self.modules) for n in self.nodes}

    def is_quantizer(self, n: fx.Node) -> bool:
        return n.op == "call_module" and isinstance(self.modules.get(str(n.target)), Quantizer)

    def bits_of(self, n: fx.Node) -> int:
        return self.modules[str(n.target)].scheme.bits  # type: ignore[union-attr]

    def source(self, n: fx.Node) -> fx.Node:
        """Walk back through pass-through ops (reshape, flatten, getitem...)."""
        while self.kind.get(n) is OpKind.PASS and tensor_inputs(n):
            n = tensor_inputs(n)[0]
        return n

    def fused_end(self, n: fx.Node) -> fx.Node:
        """The last of n -> [activation...] when each is its predecessor's only user."""
        while len(n.users) == 1:
            u = next(iter(n.users))
            if self.kind.get(u) is not OpKind.ACT:
                break
            n = u
        return n

    def output_quantizer(self, n: fx.Node) -> fx.Node | None:
        """The quantizer that re-quantizes n's (fused) output for all its consumers, if any."""
        end = self.fused_end(n)
        users = list(end.users)
        if len(users) == 1 and self.is_quantizer(users[0]):
            return users[0]
        return None

    def of_kind(self, kind: OpKind) -> list[fx.Node]:
        return [n for n in self.nodes if self.kind.get(n) is kind]


def _policy(n_quantized: int, total: int, what: str, none_text: str) -> dict[str, Any]:
    if total == 0:
        return {"policy": NA, "detail": none_text, "quantized": 0, "total": 0}
    if n_quantized == total:
        policy = "quantized"
    elif n_quantized == 0:
        policy = "full precision"
    else:
        policy = "partially quantized"
    return {"policy": policy, "detail": f"{n_quantized} of {total} {what} low-bit", "quantized": n_quantized,
            "total": total}


def _operations(gm: fx.GraphModule, g: _Graph) -> dict[str, Any]:
    adds = g.of_kind(OpKind.ADD)
    add_inputs = [g.source(a) for n in adds for a in tensor_inputs(n)]
    skip = _policy(sum(g.is_quantizer(s) for s in add_inputs), len(add_inputs), "branches entering residual adds",
                   "the model has no residual adds")
    residual = _policy(sum(g.output_quantizer(n) is not None for n in adds), len(adds),
                       "residual add outputs re-quantized", "the model has no residual adds")
    pools = g.of_kind(OpKind.POOL)
    n_req = sum(g.output_quantizer(n) is not None for n in pools)
    pooling = _policy(n_req, len(pools), "pooling outputs re-quantized", "the model has no pooling")
    if pools:
        pooling["detail"] = ("computed at high precision and re-quantized" if n_req == len(pools) else
                             "computed at high precision; output kept in float" if n_req == 0 else
                             f"{n_req} of {len(pools)} pooling outputs re-quantized")
    cats = g.of_kind(OpKind.CAT)
    cat_in = [g.source(a) for n in cats for a in tensor_inputs(n)]
    concat = _policy(sum(g.is_quantizer(s) for s in cat_in), len(cat_in), "concat inputs", "the model has no concat")
    if cats and concat["policy"] == "quantized":
        concat["detail"] += " (inputs share one quantizer per concat)"
    meta = gm.meta.get("quantbench", {})
    producer_kinds: Counter[str] = Counter()
    for n in g.nodes:
        if g.is_quantizer(n):
            src = tensor_inputs(n)[0] if tensor_inputs(n) else n
            k = g.kind.get(src, OpKind.NONE)
            while k is OpKind.ACT and tensor_inputs(src):  # a fused activation belongs to its op
                src = tensor_inputs(src)[0]
                k = g.kind.get(src, OpKind.NONE)
            producer_kinds["input" if k is OpKind.NONE else k.value] += 1
    return {
        "skip_connection": skip, "residual_connection": residual, "pooling": pooling, "concat": concat,
        "first_layer": _edge_layer(gm, g, meta.get("first_layer")),
        "last_layer": _edge_layer(gm, g, meta.get("last_layer")),
        "quantizers_by_producer": dict(sorted(producer_kinds.items())),
    }


def _edge_layer(gm: fx.GraphModule, g: _Graph, name: str | None) -> dict[str, Any]:
    if name is None:
        return {"layer": NA, "weight_bits": NA, "input_bits": NA, "output_bits": NA}
    node = next(n for n in g.nodes if n.name == name)
    layer = g.modules[str(node.target)]
    wq = getattr(layer, "weight_quantizer", None)
    ins = tensor_inputs(node)
    src = g.source(ins[0]) if ins else None
    out_q = g.output_quantizer(node)
    return {
        "layer": str(node.target),
        "weight_bits": wq.scheme.bits if wq is not None else "fp32",
        "input_bits": g.bits_of(src) if src is not None and g.is_quantizer(src) else "fp32",
        "output_bits": g.bits_of(out_q) if out_q is not None else "fp32",
    }


def collect_structure(gm: fx.GraphModule, example: Tensor) -> Structure:
    """Facts of a prepared (calibrated or not) model; ``example`` is one input batch."""
    g = _Graph(gm)
    st = Structure()
    for name, layer in weight_layers(gm):
        q = layer.weight_quantizer
        st.weight_bits[name] = q.scheme.bits if q is not None else None
        st.weight_numel[name] = layer.module.weight.numel()
        if q is not None:
            st.weight_schemes.append(_scheme_row(q))
    st.activation_schemes = [_scheme_row(q) for _, q in activation_quantizers(gm)]
    st.operations = _operations(gm, g)
    st.layers = [{"layer": li.name, "type": li.type, "weight_bits": li.w_bits if li.w_bits is not None else "fp32",
                  "input_bits": li.a_bits if li.a_bits is not None else "fp32", "kept_float": li.kept_float,
                  "overrides": li.overrides} for li in list_layers(gm)]
    st.feature_maps = _feature_maps(gm, example)
    size = model_size(gm)
    st.size_bytes, st.fp32_size_bytes = size.quantized_bytes, size.fp32_bytes
    return st


def average_weight_bits(st: Structure) -> float:
    """Weight bits averaged over all conv/linear weights, weighted by size (float layers count 32)."""
    total = sum(st.weight_numel.values())
    bits = sum(n * (st.weight_bits[k] or FP_BITS) for k, n in st.weight_numel.items())
    return bits / total if total else 0.0


def average_activation_bits(st: Structure) -> float | str:
    """Activation bits averaged over the quantized feature maps, weighted by their size."""
    total = sum(f.numel for f in st.feature_maps)
    return sum(f.numel * f.bits for f in st.feature_maps) / total if total else NA
