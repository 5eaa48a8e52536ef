"""Turn a float model into a fake-quantized fx graph for a backend, and inspect or drive it."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from quantbench.backends.spec import BackendSpec
from quantbench.graph.fold import wrap_weighted
from quantbench.graph.ops import OpKind, op_kind
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


def prepare(
    model: nn.Module,
    spec: BackendSpec,
    example_input: Tensor,
    w_observer: str = "minmax",
    a_observer: str = "minmax",
    w_observer_options: dict[str, Any] | None = None,
    a_observer_options: dict[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
) -> fx.GraphModule:
    """A fake-quantized copy of ``model`` following ``spec`` (the float model is not modified).

    Quantizers start disabled; use :func:`calibrate_activations` and :func:`calibrate_weights`
    (or :mod:`quantbench.ptq`) and :func:`set_quantizing` to run it quantized.
    """
    model = copy.deepcopy(model).eval()
    gm = trace(model, leaf_modules)
    ShapeProp(gm).propagate(example_input)
    modules = dict(gm.named_modules())
    weighted = [n.name for n in gm.graph.nodes if op_kind(n, modules) is OpKind.WEIGHTED]
    if not weighted:
        raise ValueError(f"{model.__class__.__name__} has no conv or linear layer to quantize")
    edge = {weighted[0], weighted[-1]}

    def bits_for(default: int, is_edge: bool) -> int | None:
        return spec.first_last_bits(default) if is_edge else default

    def make_weight_quantizer(target: str, node: fx.Node) -> Quantizer | None:
        bits = bits_for(spec.weight.bits, node.name in edge)
        if bits is None:
            return None
        return Quantizer(spec.weight.with_bits(bits), w_observer, True, f"{target}.weight",
                         w_observer_options)

    def make_act_quantizer(name: str, consumers: set[str]) -> Quantizer | None:
        bits = bits_for(spec.activation.bits, bool(consumers) and consumers <= edge)
        if bits is None:
            return None
        return Quantizer(spec.activation.with_bits(bits), a_observer, False, name, a_observer_options)

    wrap_weighted(gm, spec.fold_bn, make_weight_quantizer)
    sites = place_activation_quantizers(gm, spec, make_act_quantizer)
    gm.meta["quantbench"] = {
        "backend": spec,
        "sites": {s.name: s for s in sites},
        "first_layer": weighted[0],
        "last_layer": weighted[-1],
        "weighted_layers": weighted,
    }
    return gm


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


@torch.no_grad()
def calibrate_weights(gm: nn.Module) -> None:
    """Observe each layer's (folded) weight once and compute its quantization parameters."""
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
    for _, q in activation_quantizers(gm):
        site = sites.get(q.name)
        out.append(_info(q, site.role if site else "activation", site.producers if site else [],
                         site.consumers if site else []))
    return out


def _info(q: Quantizer, role: str, nodes: list[str], consumers: list[str]) -> QuantizerInfo:
    return QuantizerInfo(
        name=q.name, role=role, nodes=nodes, consumers=consumers, scheme=q.scheme,
        observer=q.observer_name, qmin=q.qmin, qmax=q.qmax,
        scale=q.scale.flatten().tolist() if q.calibrated else [],
        zero_point=q.zero_point.flatten().tolist() if q.calibrated else [], calibrated=q.calibrated,
    )


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
