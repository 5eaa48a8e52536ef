"""Seed 003's weight quantizers in QAT: the ``gaussian`` family picks ternary at 2 bits and binary at 1 bit per layer,
1-bit weights are binary {-1, +1}·s, ternary / binary filters keep at most 3 / 2 values in the training graph, after
baking and in the exported ONNX, a ternary ResNet-20 verifies bit-exactly on ONNX Runtime, and training from scratch
first estimates the BN statistics it calibrates with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from quantbench.backends import LayerOverride, load_backend
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.lower import bake_for_export
from quantbench.errors import ConfigError
from quantbench.graph.quantize import prepare, weight_layers
from quantbench.models import build_model, load_weights
from quantbench.ptq import calibrate
from quantbench.qat.config import QATConfig
from quantbench.qat.pipeline import estimate_bn_statistics
from quantbench.qat.prepare import prepare_qat, quantizer_parameters
from quantbench.qat.quantizers.gaussian import GaussianWeight
from quantbench.qat.quantizers.ternary import BinaryWeight, TernaryWeight
from quantbench.size import depthwise_layers

SHARED = Path(__file__).resolve().parents[2] / "shared"
GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 1, 8, 8, generator=GEN)
Y = torch.randint(0, 10, (64,), generator=GEN)


def _qat_graph(backend: str, w_bits: int, depthwise_bits: int | None = None, model: str = "digits_dwcnn"):
    torch.manual_seed(0)
    overrides = [LayerOverride(match="depthwise", w_bits=depthwise_bits)] if depthwise_bits else []
    spec = load_backend(backend).configure(w_bits=w_bits, a_bits=8, first_last=8, overrides=overrides,
                                           binary_weights=True)
    gm = prepare(build_model(model).eval(), spec, X[:1], "minmax", "minmax")
    calibrate(gm, [(X, None)], progress=False)
    return prepare_qat(gm, "gaussian", 3)


def _train_steps(gm, steps: int = 3) -> None:
    qparams = quantizer_parameters(gm)  # step sizes learn slowly (a large step can turn an LSQ scale negative)
    opt = torch.optim.SGD([{"params": [p for p in gm.parameters() if all(p is not q for q in qparams)]},
                           {"params": qparams, "lr": 1e-3}], lr=0.05, momentum=0.9)
    gm.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(gm(X), Y).backward()
        opt.step()
    gm.eval()


def _max_values_per_filter(w: torch.Tensor) -> int:
    return max(row.unique().numel() for row in w.reshape(w.shape[0], -1))


def test_the_gaussian_family_picks_the_rule_by_each_layers_bits():
    gm = _qat_graph("academic", 1, depthwise_bits=4)
    dw = set(depthwise_layers(build_model("digits_dwcnn")))
    rules = {name: type(layer.weight_quantizer.rule) for name, layer in weight_layers(gm)}
    first, *middle, last = list(rules)
    assert rules[first] is GaussianWeight and rules[last] is GaussianWeight  # first / last layer at 8 bits
    assert {rules[n] for n in middle if n in dw} == {GaussianWeight}
    assert {rules[n] for n in middle if n not in dw} == {BinaryWeight}
    assert {type(layer.weight_quantizer.rule) for _, layer in weight_layers(_qat_graph("academic", 2))
            } == {GaussianWeight, TernaryWeight}


def test_one_bit_weights_need_a_rule_that_makes_them_binary():
    with pytest.raises(ConfigError, match=r"\{-1, 0\}"):
        load_backend("academic").configure(w_bits=1)
    with pytest.raises(ValueError, match="zeroes every positive weight"):
        QATConfig(model="digits_cnn", w_bits=1, algorithm="lsq").check()
    for algorithm in ("gaussian", "binary"):
        spec = QATConfig(model="digits_cnn", w_bits=1, algorithm=algorithm).check().resolved_backend()
        assert spec.weight.bits == 1 and spec.binary_weights
    assert not QATConfig(model="digits_cnn", w_bits=2, algorithm="lsq").resolved_backend().binary_weights


@pytest.mark.parametrize(("w_bits", "levels"), [(2, 3), (1, 2)])
def test_ternary_and_binary_filters_keep_their_values_in_training_after_baking_and_in_onnx(w_bits, levels, tmp_path):
    gm = _qat_graph("tensorrt", w_bits)
    low = [name for name, layer in weight_layers(gm) if layer.weight_quantizer.scheme.bits == w_bits]
    assert len(low) == 6  # every layer but the first and the last (8 bits, as in seed 003)
    _train_steps(gm)
    layers = dict(weight_layers(gm))
    for name in low:  # the training graph: what the weight quantizer feeds the convolution
        with torch.no_grad():
            assert _max_values_per_filter(layers[name].weight_quantizer(layers[name].module.weight)) <= levels
    sim = bake_for_export(gm)
    baked = dict(weight_layers(sim))
    for name in low:
        assert _max_values_per_filter(baked[name].module.weight.detach()) <= levels, name
    res = export_onnx(sim, X[:1], tmp_path / "m.onnx", artefacts=[])
    model = onnx.load(str(res.path))
    codes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    low_codes = [c for c in codes.values() if c.ndim == 4 and set(np.unique(c)) <= {-1, 0, 1}]
    assert len(low_codes) >= len(low)
    for c in low_codes:
        assert max(np.unique(row).size for row in c.reshape(c.shape[0], -1)) <= levels
    r = verify_onnx(res.path, sim, [X], x64_quant_precision=True, progress=False)
    assert r.agreement == 1.0 and r.max_abs_logit_diff < 1e-4


def test_an_exported_ternary_resnet20_verifies_bit_exactly_on_onnx_runtime(tmp_path, torch_one_thread):
    from quantbench.data import load_data

    weights = SHARED / "models" / "resnet20_cifar10.safetensors"
    bundle = load_data(f"cifar10:{SHARED / 'data' / 'cifar10'}", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                       (3, 32, 32))
    x = torch.stack([bundle.test[i][0] for i in range(96)])
    y = torch.tensor([int(bundle.test[i][1]) for i in range(96)])
    model = load_weights(build_model("resnet20_cifar"), str(weights)).eval()
    spec = load_backend("tensorrt").configure(w_bits=2, a_bits=8, first_last=8)  # seed 003: first / last at 8
    gm = prepare(model, spec, x[:1], "minmax", "minmax")
    calibrate(gm, [(x[:64], None)], progress=False)
    gm = prepare_qat(gm, "gaussian", 3)
    opt = torch.optim.SGD(gm.parameters(), lr=0.004, momentum=0.9)
    gm.train()
    for i in range(2):
        opt.zero_grad()
        F.cross_entropy(gm(x[32 * i:32 * (i + 1)]), y[32 * i:32 * (i + 1)]).backward()
        opt.step()
    gm.eval()
    assert sum(isinstance(layer.weight_quantizer.rule, TernaryWeight) for _, layer in weight_layers(gm)) == 18
    sim = bake_for_export(gm)
    res = export_onnx(sim, x[:1], tmp_path / "ternary.onnx", artefacts=[])
    r = verify_onnx(res.path, sim, [x], x64_quant_precision=True, progress=False)
    assert r.agreement == 1.0 and r.max_abs_logit_diff < 1e-4


def test_training_from_scratch_calibrates_on_estimated_bn_statistics():
    torch.manual_seed(0)
    model = build_model("digits_cnn").eval()
    batches = [(X[:40], None), (X[40:], None)]
    inputs: list[torch.Tensor] = []
    hook = model.bn1.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach().double()))
    estimate_bn_statistics(model, batches, "cpu")
    hook.remove()
    assert not model.training and not model.bn1.training
    a = torch.cat(inputs)  # float64 reference: per-channel mean and unbiased variance, averaged over the batches
    means = [t.mean(dim=(0, 2, 3)) for t in inputs]
    variances = [t.var(dim=(0, 2, 3), unbiased=True) for t in inputs]
    assert a.shape[0] == 64
    torch.testing.assert_close(model.bn1.running_mean.double(), sum(means) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), sum(variances) / 2, rtol=1e-5, atol=1e-6)
