"""Quantizer placement follows each backend's rules (seed 001 E/G, seed 004 Fig. 1).

Counts for ResNet-20 and MobileNetV2 are derived by hand from the architectures; DenseNet-121 is
checked structurally (every concat's inputs share one quantizer).
"""

from __future__ import annotations

from collections import Counter
from functools import cache

import pytest
import torch
import torch.fx as fx

from quantbench.backends import backend_names, load_backend
from quantbench.graph.ops import OpKind, op_kind
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.quantize import list_quantizers, prepare
from quantbench.models import build_model
from quantbench.quant.quantizer import Quantizer

OUTPUT_BACKENDS = ["tensorrt", "snpe", "tvm", "fbgemm", "onnxruntime", "x86", "qnnpack"]
INPUT_BACKENDS = ["academic", "acl"]
FUSED_ADD_BACKENDS = ["openvino"]  # outputs, but the conv branch enters a residual add unrequantized


@cache
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=10)


@cache
def _prepared(name: str, backend: str, residual: str | None = None, skip: str | None = None) -> fx.GraphModule:
    size = 32 if name.endswith("_cifar") else 64
    spec = load_backend(backend).configure(residual=residual, skip=skip)
    return prepare(_model(name), spec, torch.randn(1, 3, size, size))


def _is_q(node: fx.Node, gm: fx.GraphModule) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), Quantizer)


def _source(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """Walk back through pass-through ops (getitem, pad, flatten...)."""
    modules = dict(gm.named_modules())
    while not _is_q(node, gm) and op_kind(node, modules) is OpKind.PASS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _nodes(gm: fx.GraphModule, kind: OpKind) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if not _is_q(n, gm) and op_kind(n, modules) is kind]


def _roles(gm: fx.GraphModule) -> Counter:
    return Counter(q.role for q in list_quantizers(gm))


def test_every_backend_is_covered():
    assert sorted(OUTPUT_BACKENDS + INPUT_BACKENDS + FUSED_ADD_BACKENDS) == backend_names()


# --------------------------------------------------------------------------- ResNet-20 (hand counts)
@pytest.mark.parametrize("backend", OUTPUT_BACKENDS)
def test_resnet20_hardware_backends_requantize_every_op(backend):
    gm = _prepared("resnet20_cifar", backend)
    # 19 convs + 1 linear; activations: image input 1, stem conv+relu 1, 9 x (conv1+relu, conv2, add+relu),
    # global pool 1; the logits are not quantized
    assert _roles(gm) == Counter(weight=20, input=1, output=1 + 9 * 3 + 1)
    for add in _nodes(gm, OpKind.ADD):
        assert all(_is_q(_source(a, gm), gm) for a in add.all_input_nodes), f"{add} has a float input"
        relu = next(iter(add.users))
        assert _is_q(next(iter(relu.users)), gm), "add (+relu) output is not re-quantized"
    for pool in _nodes(gm, OpKind.POOL):
        assert all(_is_q(u, gm) for u in pool.users)
    assert not any(_is_q(n, gm) for n in gm.graph.find_nodes(op="output")[0].all_input_nodes)


@pytest.mark.parametrize("backend", OUTPUT_BACKENDS + INPUT_BACKENDS + FUSED_ADD_BACKENDS)
def test_every_conv_and_linear_input_is_quantized(backend):
    gm = _prepared("resnet20_cifar", backend)
    layers = [n for n in gm.graph.nodes if n.op == "call_module"
              and isinstance(gm.get_submodule(str(n.target)), QuantWeighted)]
    assert len(layers) == 20
    for n in layers:
        assert _is_q(_source(n.args[0], gm), gm), f"input of {n} is not quantized"
        assert gm.get_submodule(str(n.target)).weight_quantizer is not None


@pytest.mark.parametrize("backend", INPUT_BACKENDS)
def test_resnet20_input_mode_quantizes_only_layer_inputs(backend):
    gm = _prepared("resnet20_cifar", backend)
    # one input quantizer per tensor feeding a layer: image, stem output, 9 block inputs... = 20
    assert _roles(gm) == Counter(weight=20, input=20)
    modules = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if _is_q(n, gm):
            stack, reached = list(n.users), []
            while stack:  # consumers through pass-through ops (flatten before the classifier)
                u = stack.pop()
                if op_kind(u, modules) is OpKind.PASS:
                    stack.extend(u.users)
                else:
                    reached.append(u)
            assert all(u.op == "call_module" and isinstance(modules[str(u.target)], QuantWeighted) for u in reached)
    for add in _nodes(gm, OpKind.ADD):  # adds and pooling run in float
        assert not any(_is_q(a, gm) for a in add.all_input_nodes)
        assert not any(_is_q(u, gm) for u in add.users)


def test_academic_keeps_bn_and_8bit_first_last_layer():
    gm = _prepared("resnet20_cifar", "academic")
    assert len(_nodes(gm, OpKind.BN)) == 19
    spec = load_backend("academic").configure(w_bits=4, a_bits=4)
    gm4 = prepare(_model("resnet20_cifar"), spec, torch.randn(1, 3, 32, 32))
    bits = {q.name: q.scheme.bits for q in list_quantizers(gm4)}
    assert bits["conv1.weight"] == bits["linear.weight"] == 8
    assert bits["layer2.0.conv1.weight"] == 4
    assert bits["x_in"] == 8  # input of the first layer
    assert sorted(b for b in bits.values()).count(8) == 4  # first/last weights and inputs


@pytest.mark.parametrize("backend", ["tensorrt", "snpe", "tvm", "acl", "fbgemm", "onnxruntime"])
def test_hardware_backends_fold_bn(backend):
    assert _nodes(_prepared("resnet20_cifar", backend), OpKind.BN) == []


def test_residual_fp_keeps_add_outputs_in_float():
    gm = _prepared("resnet20_cifar", "tensorrt", residual="fp")
    sites = gm.meta["quantbench"]["sites"]
    # add (+relu) outputs are not re-quantized as outputs; where they enter the next block's conv1 and
    # add (skip still quantized) they pass one shared input quantizer
    for add in _nodes(gm, OpKind.ADD):
        relu = next(iter(add.users))
        for u in relu.users:
            if _is_q(u, gm):
                assert sites[str(u.target).split(".")[-1]].role == "input"
    assert _roles(gm) == Counter(weight=20, input=1 + 8, output=1 + 9 * 2 + 1)


def test_skip_fp_leaves_branches_entering_the_add_unquantized():
    gm = _prepared("resnet20_cifar", "tensorrt", skip="fp")
    for add in _nodes(gm, OpKind.ADD):
        main = add.args[0]
        assert not _is_q(main, gm), "seed 001 Fig. 16 graph 2: the main branch enters the add in float"
    assert _roles(gm)["output"] == 1 + 9 * 2 + 1


def test_openvino_leaves_the_conv_branch_entering_an_add_unrequantized_as_its_cpu_plugin_runs_it():
    """OpenVINO's CPU plugin fuses a residual add into the convolution before it and drops that convolution's
    output requantization (measured: docs/DEPLOYMENT.md); the spec is the skip-fp placement (graph 2)."""
    gm = _prepared("resnet20_cifar", "openvino")
    for add in _nodes(gm, OpKind.ADD):
        assert not _is_q(add.args[0], gm), "the main (conv) branch enters the add in float"
        relu = next(iter(add.users))
        assert _is_q(next(iter(relu.users)), gm), "add (+relu) output is re-quantized"
    assert _roles(gm) == Counter(weight=20, input=1, output=1 + 9 * 2 + 1)


def test_residual_and_skip_fp_give_a_full_precision_residual_path():
    gm = _prepared("resnet20_cifar", "tensorrt", residual="fp", skip="fp")
    adds = _nodes(gm, OpKind.ADD)
    # from the second block on, the skip carries the previous add's float output (the first block's
    # skip is the stem's conv output, which is quantized like every conv output)
    for add in adds[1:]:
        assert not any(_is_q(_source(a, gm), gm) for a in add.all_input_nodes)
    assert _roles(gm) == Counter(weight=20, input=1 + 8, output=1 + 9 + 1)


# --------------------------------------------------------------------------- MobileNetV2
@pytest.mark.parametrize("backend", OUTPUT_BACKENDS)
def test_mobilenet_v2_hardware_placement(backend):
    gm = _prepared("mobilenet_v2", backend)
    # 52 convs + 1 linear; 10 inverted-residual adds; image 1 + 52 conv outputs + 10 adds + 1 pool
    assert len(_nodes(gm, OpKind.ADD)) == 10
    assert _roles(gm) == Counter(weight=53, input=1, output=52 + 10 + 1)


@pytest.mark.parametrize("backend", INPUT_BACKENDS)
def test_mobilenet_v2_input_mode_placement(backend):
    gm = _prepared("mobilenet_v2", backend)
    # every layer's input is a distinct tensor in MobileNetV2
    assert _roles(gm) == Counter(weight=53, input=53)


# --------------------------------------------------------------------------- DenseNet-121 (concat)
@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
def test_densenet_concat_inputs_share_one_quantizer(backend):
    gm = _prepared("densenet121", backend)
    cats = _nodes(gm, OpKind.CAT)
    assert len(cats) == 58 + 4  # one per dense layer plus one per dense block
    for cat in cats:
        targets = {a.target for a in cat.all_input_nodes}
        assert len(targets) == 1, f"{cat} inputs use {len(targets)} quantizers"
        assert _is_q(cat.all_input_nodes[0], gm)
    assert _roles(gm)["concat"] == len(cats)


@pytest.mark.parametrize("backend", INPUT_BACKENDS)
def test_densenet_input_mode_leaves_concat_in_float(backend):
    gm = _prepared("densenet121", backend)
    for cat in _nodes(gm, OpKind.CAT):
        assert not any(_is_q(a, gm) for a in cat.all_input_nodes)
    assert _roles(gm)["weight"] == 121
    assert "concat" not in _roles(gm)


# --------------------------------------------------------------------------- listing API
def test_list_quantizers_reports_node_scheme_scale_and_zero_point():
    gm = _prepared("resnet20_cifar", "tensorrt")
    infos = {q.name: q for q in list_quantizers(gm)}
    w = infos["layer1.0.conv1.weight"]
    assert w.role == "weight" and w.scheme.per_channel and w.nodes == ["layer1.0.conv1"]
    x = infos["x_in"]
    assert x.role == "input" and x.consumers == ["conv1"] and not x.calibrated and x.scale == []
