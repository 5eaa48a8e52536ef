"""Turn a float model into a fake-quantized fx graph for a backend, and inspect or drive it."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from quantbench.backends.overrides import (
    LayerOverride,
    Side,
    first_last_overrides,
    quantizer_side,
    resolve_layers,
    shared_activation,
)
from quantbench.backends.spec import BackendSpec
from quantbench.errors import ConfigError, QuantbenchError
from quantbench.graph.fold import wrap_weighted
from quantbench.graph.ops import OpKind, op_kind, tensor_inputs
from quantbench.graph.placement import Site, place_activation_quantizers
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.trace import trace
from quantbench.quant.quantizer import Quantizer
from quantbench.quant.scheme import QScheme


@dataclass
class QuantizerInfo:
    """One quantizer of a prepared model, for listing and reports."""

    name: str
    role: str  # "weight" | "input" | "output" | "concat"
    nodes: list[str]  # the layer (weights) or the producing node(s) (activations)
    consumers: list[str]
    scheme: QScheme
    observer: str
    qmin: int
    qmax: int
    scale: list[float]
    zero_point: list[int]
    calibrated: bool
    note: str = ""  # e.g. a quantizer shared by layers with different overrides


@dataclass
class LayerInfo:
    """One conv/linear layer of a prepared model: how its weights and its input are quantized."""

    name: str  # the module name in the model
    type: str
    kept_float: bool
    w_bits: int | None  # None: float weights
    a_bits: int | None  # bits of the quantizer on its input (None: float input)
    w_scheme: str
    a_scheme: str
    input_quantizer: str
    overrides: list[str]  # the patterns of the override entries that matched, in order
    note: str = ""


def prepare(
    model: nn.Module,
    spec: BackendSpec,
    example_input: Tensor,
    w_observer: str = "minmax",
    a_observer: str = "minmax",
    w_observer_options: dict[str, Any] | None = None,
    a_observer_options: dict[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    overrides: Sequence[LayerOverride] = (),
) -> fx.GraphModule:
    """A fake-quantized copy of ``model`` following ``spec`` (the float model is not modified).

    ``overrides`` refine the spec per layer after its own ``first_last`` and ``overrides:`` (the
    last matching entry wins, field by field; see :mod:`quantbench.backends.overrides`).
    Quantizers start disabled; use :func:`calibrate_activations` and :func:`calibrate_weights`
    (or :mod:`quantbench.ptq`) and :func:`set_quantizing` to run it quantized.
    """
    model = copy.deepcopy(model).eval()
    gm = trace(model, leaf_modules)
    ShapeProp(gm).propagate(example_input)
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if op_kind(n, modules) is OpKind.WEIGHTED]
    if not nodes:
        raise ValueError(f"{model.__class__.__name__} has no conv or linear layer to quantize")
    weighted = [n.name for n in nodes]
    target = {n.name: str(n.target) for n in nodes}
    entries = [*first_last_overrides(target[weighted[0]], target[weighted[-1]], spec.first_last),
               *spec.overrides, *overrides]
    base_w = Side(spec.weight, w_observer, dict(w_observer_options or {}))
    base_a = Side(spec.activation, a_observer, dict(a_observer_options or {}))
    layers = resolve_layers([(target[n], modules[target[n]]) for n in weighted], entries, base_w, base_a)
    by_node = {n: layers[target[n]] for n in weighted}
    notes: dict[str, str] = {}
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    by_quantizer = [o for o in entries if o.targets_quantizer]
    act_names: list[str] = []
    quantizer_matched: dict[str, list[str]] = {}

    def make_weight_quantizer(name: str, node: fx.Node) -> Quantizer | None:
        side = layers[name].weight
        if side is None:
            return None
        return Quantizer(side.scheme, side.observer, True, f"{name}.weight", side.options)

    def make_act_quantizer(name: str, consumers: set[str]) -> Quantizer | None:
        readers = sorted(consumers, key=lambda c: order.get(c, len(order)))
        side, conflict = shared_activation(
            [by_node[c].activation if c in by_node else base_a for c in readers], base_a)
        if side is None:
            return None
        act_names.append(name)
        if conflict:
            asked = ", ".join(f"{target.get(c, c)}: {_side_text(by_node[c].activation if c in by_node else base_a)}"
                              for c in readers)
            notes[name] = f"read by layers with different settings ({asked}): took the highest precision"
        side, pats = quantizer_side(name, side, by_quantizer, f"override of activation quantizer {name}")
        if pats:
            quantizer_matched[name] = pats
            notes[name] = "; ".join(filter(None, [notes.get(name, ""), f"set by {', '.join(pats)}"]))
        return Quantizer(side.scheme, side.observer, False, name, side.options)

    wrap_weighted(gm, spec.fold_bn, make_weight_quantizer)
    sites = place_activation_quantizers(gm, spec, make_act_quantizer)
    for o in by_quantizer:
        if not any(o.match in pats for pats in quantizer_matched.values()):
            shown = ", ".join(act_names[:12]) + (f", ... ({len(act_names)})" if len(act_names) > 12 else "")
            raise ConfigError(f"override pattern {o.match!r} matches no activation quantizer; they are: {shown} "
                              "(quantbench ptq --list-quantizers prints them; a tensor whose readers are all kept "
                              "in float has none)")
    gm.meta["quantbench"] = {
        "backend": spec,
        "sites": {s.name: s for s in sites},
        "first_layer": weighted[0],
        "last_layer": weighted[-1],
        "weighted_layers": weighted,
        "layer_settings": by_node,
        "overrides": entries,
        "notes": notes,
    }
    return gm


def _side_text(side: Side | None) -> str:
    return "float" if side is None else f"{side.scheme.describe()} {side.observer}"


def weight_layers(gm: nn.Module) -> Iterator[tuple[str, QuantWeighted]]:
    for name, m in gm.named_modules():
        if isinstance(m, QuantWeighted):
            yield name, m


def activation_quantizers(gm: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for name, m in gm.named_modules():
        if isinstance(m, Quantizer) and not m.is_weight:
            yield name, m


def all_quantizers(gm: nn.Module) -> Iterator[Quantizer]:
    for m in gm.modules():
        if isinstance(m, Quantizer):
            yield m


def set_observing(gm: nn.Module, on: bool, weights: bool = False) -> None:
    """Switch observation of activation quantizers (and weight quantizers with ``weights``)."""
    for q in all_quantizers(gm):
        if weights or not q.is_weight:
            q.observing = on


def set_quantizing(gm: nn.Module, on: bool) -> None:
    """Switch fake quantization of every quantizer."""
    for q in all_quantizers(gm):
        q.quantizing = on


def refuse_if_reconstructed(gm: nn.Module, what: str) -> None:
    """Raise when ``gm`` was reconstructed (AdaRound, BRECQ, QDrop): ``what`` would undo the learned rounding."""
    meta = getattr(gm, "meta", {}).get("quantbench", {})
    if meta.get("reconstructed"):
        raise QuantbenchError(
            f"the weights were reconstructed ({meta['reconstructed']}): {what} would re-derive the weight scales "
            "and undo the learned rounding. Order: calibrate -> BN re-calibration (--bn-calib) -> reconstruct")


@torch.no_grad()
def calibrate_weights(gm: nn.Module) -> None:
    """Observe each layer's (folded) weight once and compute its quantization parameters.

    Refused on a reconstructed model: new scales would undo the learned rounding.
    """
    refuse_if_reconstructed(gm, "calibrating the weights again")
    for _, layer in weight_layers(gm):
        q = layer.weight_quantizer
        if q is None:
            continue
        q.reset_observer()
        w, _ = layer.folded_weight_bias()
        q.observer.observe(w)
        q.compute_qparams()


def finish_activation_calibration(gm: nn.Module) -> None:
    """Compute activation quantization parameters from the observers and stop observing."""
    for _, q in activation_quantizers(gm):
        q.compute_qparams()
    set_observing(gm, False)


def list_quantizers(gm: fx.GraphModule) -> list[QuantizerInfo]:
    """Every quantizer with its node, scheme, scale and zero-point."""
    meta = gm.meta.get("quantbench", {})
    sites: dict[str, Site] = meta.get("sites", {})
    out: list[QuantizerInfo] = []
    for name, layer in weight_layers(gm):
        if layer.weight_quantizer is not None:
            out.append(_info(layer.weight_quantizer, "weight", [name], [name]))
    notes: dict[str, str] = meta.get("notes", {})
    for _, q in activation_quantizers(gm):
        site = sites.get(q.name)
        out.append(_info(q, site.role if site else "activation", site.producers if site else [],
                         site.consumers if site else [], notes.get(q.name, "")))
    return out


def _info(q: Quantizer, role: str, nodes: list[str], consumers: list[str], note: str = "") -> QuantizerInfo:
    return QuantizerInfo(
        name=q.name, role=role, nodes=nodes, consumers=consumers, scheme=q.scheme,
        observer=q.observer_name, qmin=q.qmin, qmax=q.qmax,
        scale=q.scale.flatten().tolist() if q.calibrated else [],
        zero_point=q.zero_point.flatten().tolist() if q.calibrated else [], calibrated=q.calibrated, note=note,
    )


def _input_quantizer(n: fx.Node, modules: dict[str, nn.Module]) -> Quantizer | None:
    """The activation quantizer a layer's input comes from (through pass-through ops), if any."""
    ins = tensor_inputs(n)
    src = ins[0] if ins else None
    while src is not None:
        mod = modules.get(str(src.target)) if src.op == "call_module" else None
        if isinstance(mod, Quantizer):
            return mod
        if op_kind(src, modules) is not OpKind.PASS or not tensor_inputs(src):
            return None
        src = tensor_inputs(src)[0]
    return None


def list_layers(gm: fx.GraphModule) -> list[LayerInfo]:
    """Every conv/linear layer with the weight and input bits it got (after overrides), in graph order."""
    meta = gm.meta.get("quantbench", {})
    settings = meta.get("layer_settings", {})
    notes: dict[str, str] = meta.get("notes", {})
    modules = dict(gm.named_modules())
    out: list[LayerInfo] = []
    for n in gm.graph.nodes:
        layer = modules.get(str(n.target)) if n.op == "call_module" else None
        if not isinstance(layer, QuantWeighted):
            continue
        wq = layer.weight_quantizer
        aq = _input_quantizer(n, modules)
        s = settings.get(n.name)
        out.append(LayerInfo(
            name=str(n.target), type=s.type if s else type(layer.module).__name__, kept_float=wq is None,
            w_bits=wq.scheme.bits if wq is not None else None, a_bits=aq.scheme.bits if aq is not None else None,
            w_scheme=wq.scheme.describe() if wq is not None else "float",
            a_scheme=aq.scheme.describe() if aq is not None else "float",
            input_quantizer=aq.name if aq is not None else "", overrides=list(s.matched) if s else [],
            note=notes.get(aq.name, "") if aq is not None else "",
        ))
    return out


def bake(gm: fx.GraphModule) -> fx.GraphModule:
    """Write every learned grid back as static quantization parameters (in place; returns ``gm``).

    Each learning quantizer keeps its place and becomes the PTQ quantizer of the grid its rule learned; each
    layer whose weight quantizer learned gets its deployed weight (BN folded) on that grid. The graph then
    evaluates as it did while learning, runs ONNX Runtime's integer arithmetic where its backend simulates it,
    and exports like a PTQ model. Rules with non-uniform levels (APoT) are refused.
    """
    for _, layer in weight_layers(gm):
        layer.bake()
    for _, q in activation_quantizers(gm):
        q.bake()
    gm.meta.pop("quantbench_qat", None)
    return gm
