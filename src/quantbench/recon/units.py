"""Reconstruction units from the fx graph: subgraphs between single-tensor cut points.

A *cut point* is a node whose output is the only tensor flowing from the nodes before it (placeholders
included) to the nodes after it. Between two cut points lies a *segment*; a unit is one segment with
conv/linear layers in it, plus the segments after it that only pass its output on (BN, activation,
reshape, the output quantizer), so each unit ends where its backend re-quantizes (tensorrt: after add →
ReLU → quantizer; academic: after add → ReLU, no quantizer). Segments with no layer (a pool) start the next
unit. In ``block`` granularity, consecutive units whose layers share their deepest non-container module
(a torchvision ``InvertedResidual`` without shortcut, split by cut points after each conv) are merged
again: the module tree recorded by ``torch.fx`` in ``node.meta["nn_module_stack"]`` is a hint, not a
requirement (a graph without it is partitioned by cut points alone). Nothing is specific to an
architecture: ResNets give stem + one unit per residual block + head, MobileNetV2 one unit per inverted
residual. ``layer`` granularity makes each conv/linear (with its BN and activation) its own unit, which
needs no cut point: its input is captured inside the surrounding block unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch.fx as fx
from torch import nn

from quantbench.graph.ops import OpKind, op_kind
from quantbench.graph.qmodules import QuantWeighted
from quantbench.quant.quantizer import Quantizer

Granularity = Literal["block", "layer"]
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TRAILING = (OpKind.BN, OpKind.ACT, OpKind.PASS)


@dataclass
class Unit:
    """One reconstruction unit: a single-input, single-output subgraph of a prepared model."""

    name: str
    nodes: list[fx.Node]  # in graph order, the input excluded
    input: fx.Node  # the node whose output enters the unit (a cut point or the placeholder)
    output: fx.Node  # the node whose output leaves it
    layers: list[str] = field(default_factory=list)  # module names of its conv/linear layers
    quantizers: list[str] = field(default_factory=list)  # module names of its activation quantizers
    owner: str | None = None  # the deepest non-container module holding every layer (None: the model)

    def describe(self) -> str:
        return f"{self.name}: {len(self.layers)} layer(s) {', '.join(self.layers)}; " \
               f"{len(self.quantizers)} activation quantizer(s)"


def _tensor_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op not in ("get_attr", "output")]


def cut_points(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes whose output is the only value passed from everything before them to everything after them."""
    nodes = _tensor_nodes(gm.graph)
    index = {n: i for i, n in enumerate(nodes)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    last = len(nodes)  # the output node reads at this index
    reach = -1  # the furthest index read by any node strictly before the current one
    cuts: list[fx.Node] = []
    for i, n in enumerate(nodes):
        if reach <= i:
            cuts.append(n)
        uses = [index.get(u, last) for u in n.users if u is not out_node] + ([last] if out_node in n.users else [])
        reach = max(reach, max(uses, default=i))
    return cuts


def _kind(n: fx.Node, modules: dict[str, nn.Module]) -> OpKind | str:
    if n.op == "call_module":
        m = modules[str(n.target)]
        if isinstance(m, QuantWeighted):
            return OpKind.WEIGHTED
        if isinstance(m, Quantizer):
            return "quantizer"
    return op_kind(n, modules)


def _stack(n: fx.Node) -> list[tuple[str, type]]:
    """The module path of ``n`` (outermost first), from fx's ``nn_module_stack`` meta, without ``n`` itself."""
    stack = n.meta.get("nn_module_stack") or {}
    path = [(str(v[0]) if isinstance(v, tuple) else str(k), v[1] if isinstance(v, tuple) else object)
            for k, v in stack.items()]
    return [p for p in path if p[0] != str(n.target)]


def _owner(layer_nodes: list[fx.Node]) -> str | None:
    """The deepest module, not a plain container, that every layer of the list lies in."""
    stacks = [_stack(n) for n in layer_nodes]
    if not stacks or any(not s for s in stacks):
        return None
    common = stacks[0]
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k][0] == s[k][0]:
            k += 1
        common = common[:k]
    for name, typ in reversed(common):
        if isinstance(typ, type) and not issubclass(typ, _CONTAINERS):
            return name
    return None


def partition(gm: fx.GraphModule, granularity: Granularity = "block") -> list[Unit]:
    """The reconstruction units of a prepared model, in graph order; every conv/linear lies in exactly one."""
    modules = dict(gm.named_modules())
    nodes = _tensor_nodes(gm.graph)
    cuts = set(cut_points(gm))
    placeholder = nodes[0]
    # segments: runs of nodes that end at a cut point
    segments: list[list[fx.Node]] = []
    cur: list[fx.Node] = []
    for n in nodes[1:]:
        cur.append(n)
        if n in cuts:
            segments.append(cur)
            cur = []
    if cur:
        segments.append(cur)
    # units: a segment with layers plus the following segments that only pass its output on
    groups: list[list[fx.Node]] = []
    for seg in segments:
        kinds = [_kind(n, modules) for n in seg]
        trailing = all(k in _TRAILING or k == "quantizer" for k in kinds)
        has_layer = OpKind.WEIGHTED in kinds
        if groups and trailing and _has_layer(groups[-1], modules) and not has_layer:
            groups[-1].extend(seg)
        elif groups and not _has_layer(groups[-1], modules):
            groups[-1].extend(seg)  # a pool or add before any layer: it opens the next unit
        else:
            groups.append(list(seg))
    if len(groups) > 1 and not _has_layer(groups[-1], modules):
        groups[-2].extend(groups.pop())
    units = [_unit(g, inp, modules) for g, inp in zip(groups, _inputs(groups, placeholder), strict=True)]
    if granularity == "block":
        units = _merge_owned(units, modules)
    elif granularity == "layer":
        units = [lu for u in units for lu in _layer_units(u, modules)]
    else:
        raise ValueError(f"unknown unit granularity {granularity!r}: use 'block' or 'layer'")
    for i, u in enumerate(units):
        u.name = f"unit{i}"
    return units


def _has_layer(group: list[fx.Node], modules: dict[str, nn.Module]) -> bool:
    return any(_kind(n, modules) is OpKind.WEIGHTED for n in group)


def _inputs(groups: list[list[fx.Node]], placeholder: fx.Node) -> list[fx.Node]:
    return [placeholder] + [g[-1] for g in groups[:-1]]


def _unit(group: list[fx.Node], inp: fx.Node, modules: dict[str, nn.Module]) -> Unit:
    layers = [n for n in group if _kind(n, modules) is OpKind.WEIGHTED]
    quantizers = [str(n.target) for n in group if _kind(n, modules) == "quantizer"]
    return Unit("", group, inp, group[-1], [str(n.target) for n in layers], quantizers, _owner(layers))


def _merge_owned(units: list[Unit], modules: dict[str, nn.Module]) -> list[Unit]:
    out: list[Unit] = []
    for u in units:
        prev = out[-1] if out else None
        if prev is not None and u.owner is not None and prev.owner is not None:
            merged = _unit(prev.nodes + u.nodes, prev.input, modules)
            if merged.owner is not None:  # both lie in one block module (not only in a container)
                out[-1] = merged
                continue
        out.append(u)
    return out


def fuse_end(n: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The last node of ``n`` → [BN] → [activation], each the previous one's only user (the layer's output)."""
    follow: tuple[OpKind, ...] = (OpKind.BN, OpKind.ACT)
    while len(n.users) == 1:
        u = next(iter(n.users))
        k = _kind(u, modules)
        if k not in follow:
            break
        follow = (OpKind.ACT,)
        n = u
    return n


def _layer_units(u: Unit, modules: dict[str, nn.Module]) -> list[Unit]:
    """Each layer of ``u`` with its BN and activation as a unit; its input is the layer's own input node."""
    out: list[Unit] = []
    for n in u.nodes:
        if _kind(n, modules) is not OpKind.WEIGHTED:
            continue
        end = fuse_end(n, modules)
        group = [n]
        while group[-1] is not end:
            group.append(next(iter(group[-1].users)))
        inp = n.args[0]
        assert isinstance(inp, fx.Node)
        out.append(Unit("", group, inp, end, [str(n.target)], [], u.owner))
    return out


def extract(gm: fx.GraphModule, inp: fx.Node, out: fx.Node, nodes: list[fx.Node] | None = None,
            also: Sequence[fx.Node] = ()) -> fx.GraphModule:
    """A GraphModule computing ``out`` from ``inp``'s value, sharing ``gm``'s modules (training it trains ``gm``).

    ``nodes`` (default: every node between ``inp`` and ``out`` in graph order) are copied in order; the
    constants they read (``get_attr``) come along; what ``out`` does not need is removed. With ``also`` (nodes
    among ``nodes``), it returns the tuple ``(out, *also)``: intermediate values from the same pass.
    """
    all_nodes = list(gm.graph.nodes)
    if nodes is None:
        i, j = all_nodes.index(inp), all_nodes.index(out)
        nodes = all_nodes[i + 1:j + 1]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {inp: graph.placeholder("x")}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise ValueError(f"node {a.name} feeds the subgraph {inp.name} -> {out.name} from outside: "
                                 "it is not a single-input unit")
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in nodes:
        if n not in env:
            env[n] = graph.node_copy(n, lookup)
    graph.output(tuple(env[o] for o in (out, *also)) if also else env[out])
    sub = fx.GraphModule(gm, graph, f"{inp.name}_to_{out.name}")
    sub.graph.eliminate_dead_code()
    sub.recompile()
    return sub


def format_partition(units: list[Unit]) -> list[dict[str, object]]:
    """The partition as plain rows (for ``quantbench units`` and cards)."""
    return [{"unit": u.name, "input": u.input.name, "output": u.output.name, "layers": u.layers,
             "activation_quantizers": u.quantizers, "owner": u.owner or ""} for u in units]
