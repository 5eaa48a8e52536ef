"""Check that a simulated model can be deployed, and swap its modules for export stand-ins."""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn

from quantbench.backends.spec import BackendSpec
from quantbench.deploy.errors import ExportError
from quantbench.deploy.qdq import ExportQDQ, ExportWeighted, PlainAdd, PlainGlobalAvgPool
from quantbench.errors import QuantbenchError
from quantbench.graph import requant
from quantbench.graph.linking import vanishes
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.quantize import activation_quantizers, bake, weight_layers
from quantbench.graph.requant import IntAdd, IntGlobalAvgPool, Links
from quantbench.quant.quantizer import Quantizer

MAX_EXPORT_BITS = 8


def backend_of(gm: nn.Module) -> BackendSpec:
    """The backend spec a prepared model was built for."""
    meta = getattr(gm, "meta", {}).get("quantbench") if isinstance(gm, fx.GraphModule) else None
    if not meta or not isinstance(meta.get("backend"), BackendSpec):
        raise ExportError("this model was not prepared by quantbench: pass the result of "
                          "quantbench.graph.quantize.prepare(...) after calibration")
    return meta["backend"]


def check_spec(spec: BackendSpec) -> None:
    """Refuse backends whose simulation no integer runtime executes."""
    if not spec.deployable:
        raise ExportError(f"backend {spec.name!r} is not deployable: {spec.not_deployable_because}")
    if spec.arithmetic == "fake_quant":
        raise ExportError(f"backend {spec.name!r} simulates with {spec.arithmetic!r} arithmetic, so its simulation "
                          "would not match an integer runtime; set `arithmetic: onnxruntime` (or a torch engine's) "
                          "in its spec")
    too_wide = [f"{what} {s.bits} bits" for what, s in (("weights", spec.weight), ("activations", spec.activation))
                if s.bits > MAX_EXPORT_BITS]
    if too_wide:
        raise ExportError(f"ONNX QuantizeLinear at opset 13 holds 8-bit integers but {too_wide[0]} were asked for; "
                          f"export at --w-bits/--a-bits <= {MAX_EXPORT_BITS}")


def check_exportable(gm: fx.GraphModule) -> BackendSpec:
    """Refuse what no integer runtime can execute as simulated; returns the backend spec."""
    spec = backend_of(gm)
    check_spec(spec)
    quantizers: list[tuple[str, Quantizer]] = [(n, q) for n, q in activation_quantizers(gm)]
    quantizers += [(f"{n}.weight", layer.weight_quantizer) for n, layer in weight_layers(gm)
                   if layer.weight_quantizer is not None]
    missing = [n for n, q in quantizers if not q.calibrated]
    if missing:
        raise ExportError(f"the model was never calibrated: {len(missing)} quantizer(s) have no scale / zero-point "
                          f"(first: {missing[0]}); calibrate it first (quantbench.ptq.calibrate, or `quantbench "
                          "export` with --calib-size) -- exporting would invent quantization parameters")
    wide = [f"{n} ({q.scheme.bits} bits)" for n, q in quantizers if q.scheme.bits > MAX_EXPORT_BITS]
    if wide:
        raise ExportError(f"ONNX QuantizeLinear at opset 13 holds 8-bit integers but {wide[0]} is wider; "
                          f"export at --w-bits/--a-bits <= {MAX_EXPORT_BITS}")
    for n, q in quantizers:
        if not q.is_weight and q.axis is not None and (q.qmin, q.qmax) not in ((0, 255), (-128, 127)):
            raise ExportError(f"{n}: per-channel activations with a narrow range cannot be clipped per channel "
                              "in ONNX; use per-tensor activations")
    return spec


def bake_for_export(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with every learned grid baked into static parameters (a QAT or reconstructed graph;
    a PTQ graph is copied unchanged), refused with the reason where a rule has no integer grid."""
    out = copy.deepcopy(gm).eval()
    try:
        return bake(out)
    except QuantbenchError as exc:
        raise ExportError(str(exc)) from exc


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def lower_for_export(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose quantizers and quantized layers emit ONNX QDQ nodes when exported."""
    check_exportable(gm)
    out = copy.deepcopy(gm).eval()
    linked = {name: m.links for name, m in requant.linked_ops(out).items()}
    moves = {name: links for name, links in linked.items() if links.needs_copy and links.fusable()}
    regrids = {name: links for name, links in linked.items()
               if any(links.regrid) and requant.integer_kernel(out.get_submodule(name)) is not None}
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantWeighted) and m.weight_quantizer is not None:
            _set(out, name, ExportWeighted(m, name))
        elif isinstance(m, QuantWeighted):  # a layer kept in float (first/last layer policy 'fp')
            w, b = m.folded_weight_bias()
            _set(out, name, _float_layer(m.module, w.detach(), b.detach() if b is not None else None))
        elif isinstance(m, Quantizer) and not m.is_weight:
            _set(out, name, ExportQDQ(m, name.removeprefix("qb_act.")))
        elif isinstance(m, IntAdd):
            _set(out, name, PlainAdd())
        elif isinstance(m, IntGlobalAvgPool):
            _set(out, name, PlainGlobalAvgPool())
    _quantize_before_clamps(out, moves)
    _regrid_inputs(out, regrids)
    _one_int8_pair_per_consumer(out)
    out.recompile()
    return out


def _regrid_inputs(out: fx.GraphModule, regrids: dict[str, Links]) -> None:
    """Re-quantize inputs that reach an integer op through value-preserving ops (pad, slice, flatten...)
    with a copy of their quantizer, so ORT sees DequantizeLinear -> op; exact, the values are on the grid."""
    holder = _holder(out)
    for node in list(out.graph.nodes):
        links = regrids.get(str(node.target)) if node.op == "call_module" else None
        if links is None:
            continue
        for i, (q, regrid) in enumerate(zip(links.inputs, links.regrid, strict=True)):
            if not regrid or q is None:
                continue
            arg = node.args[i]
            name = f"{q.name}__regrid_{node.name}"
            holder.add_module(name, ExportQDQ(q, name, copy_of=q.name))
            with out.graph.inserting_before(node):
                qnode = out.graph.call_module(f"qb_act_copy.{name}", (arg,))
            node.replace_input_with(arg, qnode)
    out.graph.lint()


def _holder(out: fx.GraphModule) -> nn.Module:
    if not hasattr(out, "qb_act_copy"):
        out.add_module("qb_act_copy", nn.Module())
    return out.get_submodule("qb_act_copy")


def _readers(out: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The ops that will read ``node`` in ONNX (looking through modules the exporter drops)."""
    modules = dict(out.named_modules())
    found: list[fx.Node] = []
    for u in node.users:
        found.extend(_readers(out, u) if vanishes(u, modules) else [u])
    return found


def _one_int8_pair_per_consumer(out: fx.GraphModule) -> None:
    """An int8 quantizer read by several ops gets one QuantizeLinear/DequantizeLinear pair per reader.

    ORT converts an int8 pair to uint8 (QDQS8ToU8Transformer) only when the QuantizeLinear has one consumer;
    a tensor read twice would stay int8 while its neighbours become uint8, and ops mixing the two types run
    in float. The extra readers get a pair of their own (same scale and zero-point), except after an op ORT
    could fuse (a second QuantizeLinear would stop that fusion; :func:`quantbench.graph.requant.stays_int8`
    tells the simulation such a tensor stays int8)."""
    holder = _holder(out)
    for node in list(out.graph.nodes):
        m = out.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(m, ExportQDQ) or m.qmin >= 0 or m.keeps_int8:
            continue
        readers = _readers(out, node)
        if len(readers) < 2:
            continue
        for k, reader in enumerate(readers[1:], start=1):
            name = f"{m.qname}__reader{k}"
            dup = copy.deepcopy(m)
            dup.qname, dup.copy_of = name, m.copy_of or m.qname
            holder.add_module(name, dup)
            with out.graph.inserting_before(reader):
                qnode = out.graph.call_module(f"qb_act_copy.{name}", node.args)
            for arg in reader.all_input_nodes:  # the quantizer itself or a dropped module after it
                if arg is node or node in _ancestors_through_vanish(out, arg):
                    reader.replace_input_with(arg, qnode)
    out.graph.lint()


def _ancestors_through_vanish(out: fx.GraphModule, n: fx.Node) -> list[fx.Node]:
    modules = dict(out.named_modules())
    chain = []
    while vanishes(n, modules) and n.all_input_nodes:
        n = n.all_input_nodes[0]
        chain.append(n)
    return chain


def _quantize_before_clamps(out: fx.GraphModule, moves: dict[str, Links]) -> None:
    """``op -> clamp -> Q`` becomes ``op -> Q' -> clamp -> Q`` (``Q'`` a copy of ``Q``) where ORT would keep
    the clamp and so run the op in float; clamping commutes with a monotone quantizer, so values are equal."""
    if not moves:
        return
    holder = _holder(out)
    for node in list(out.graph.nodes):
        links = moves.get(str(node.target)) if node.op == "call_module" else None
        if links is None or len(node.users) != 1:
            continue
        assert links.out_q is not None
        qname = links.out_q.name
        copy_name = f"{qname}__before_{links.acts[0].kind}"
        holder.add_module(copy_name, ExportQDQ(links.out_q, copy_name, copy_of=qname))
        first = next(iter(node.users))
        with out.graph.inserting_after(node):
            qnode = out.graph.call_module(f"qb_act_copy.{copy_name}", (node,))
        first.replace_input_with(node, qnode)
    out.graph.lint()


def _float_layer(module: nn.Module, w, b) -> nn.Module:
    layer = copy.deepcopy(module)
    layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    if b is not None:
        layer.bias = nn.Parameter(b.clone(), requires_grad=False)
    return layer
