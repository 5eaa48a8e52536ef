"""One quantizer from calibration to deployment: PTQ-calibrate -> enable a QAT learning rule in place -> one
training step -> bake -> export -> ONNX Runtime, for every deployable QAT algorithm and BN-fold strategy."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.backends import load_backend
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.lower import bake_for_export
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.quantize import all_quantizers, prepare, weight_layers
from quantbench.models import build_model
from quantbench.ptq import calibrate
from quantbench.qat.prepare import prepare_qat, quantizer_parameters
from quantbench.qat.quantizers import list_algorithms
from quantbench.quant.quantizer import Quantizer

DEPLOYABLE_ALGORITHMS = list_algorithms(deployable=True)
GEN = torch.Generator().manual_seed(0)
X = torch.randn(64, 1, 8, 8, generator=GEN)
Y = torch.randint(0, 10, (64,), generator=GEN)


@cache
def _float_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("digits_cnn").train()
    with torch.no_grad():  # non-trivial running statistics, so every fold strategy has something to fold
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8, generator=GEN))
    return model.eval()


def _calibrated():
    gm = prepare(_float_model(), load_backend("onnxruntime"), X[:1], "minmax", "minmax")
    calibrate(gm, [(X, None)], progress=False)
    return gm


def test_the_switches_are_buffers_that_survive_state_dict_and_to():
    gm = _calibrated()
    prepare_qat(gm, "lsq", 3)
    fresh = _calibrated()
    for q in all_quantizers(fresh):
        q.quantizing = False
    prepare_qat(fresh, "lsq", 3)
    for q in all_quantizers(fresh):
        q.quantizing = False
    fresh.load_state_dict(gm.state_dict())
    fresh.to("cpu")
    assert all(q.quantizing and q.learning and not q.observing for q in all_quantizers(fresh))


def test_prepare_qat_swaps_no_module():
    gm = _calibrated()
    before = {name: id(m) for name, m in gm.named_modules()}
    prepare_qat(gm, "lsq", 3)
    after = {name: id(m) for name, m in gm.named_modules() if not name.endswith(".rule")}
    assert after and all(before.get(name) == ident for name, ident in after.items())  # unused aliases may go
    assert {n for n, m in gm.named_modules() if isinstance(m, (Quantizer, QuantWeighted))} <= set(after)


@pytest.mark.parametrize("bn_fold", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("algorithm", DEPLOYABLE_ALGORITHMS)
def test_calibrate_learn_step_bake_export_verify(algorithm: str, bn_fold: int, tmp_path):
    gm = prepare_qat(_calibrated(), algorithm, bn_fold)
    qparams = quantizer_parameters(gm)
    opt = torch.optim.SGD([{"params": [p for p in gm.parameters() if all(p is not q for q in qparams)]},
                           {"params": qparams, "lr": 1e-3}], lr=0.01)
    gm.train()
    opt.zero_grad()
    F.cross_entropy(gm(X), Y).backward()
    opt.step()
    gm.eval()
    with torch.no_grad():
        qat_out = gm(X)
    sim = bake_for_export(gm)
    assert not any(q.learning or q.rule is not None for q in all_quantizers(sim))
    assert all(layer.bn is None for _, layer in weight_layers(sim))
    with torch.no_grad():
        sim_out = sim(X)
    # the baked graph computes ONNX Runtime's integer arithmetic (int32 bias, integer requantization): the
    # same predictions as the learning graph up to the rounding of the bias and of the requantization
    assert (sim_out.argmax(1) == qat_out.argmax(1)).float().mean() >= 0.95
    res = export_onnx(sim, X[:1], tmp_path / "m.onnx", artefacts=[])
    r = verify_onnx(res.path, sim, [X], x64_quant_precision=True, progress=False)
    assert r.agreement == 1.0 and r.max_abs_logit_diff < 1e-4


@pytest.mark.parametrize(("algorithm", "levels"), [("ternary", 3), ("binary", 2)])
def test_ternary_and_binary_weights_keep_their_levels_through_bake(algorithm: str, levels: int):
    gm = prepare_qat(_calibrated(), algorithm, 3)
    gm.train()
    F.cross_entropy(gm(X), Y).backward()
    sim = bake_for_export(gm)
    for name, layer in weight_layers(sim):
        w = layer.module.weight.detach()
        assert layer.weight_quantizer is not None and layer.weight_quantizer.scale.numel() == w.shape[0], name
        codes = w / layer.weight_quantizer.scale.reshape(-1, *([1] * (w.dim() - 1)))
        assert set(torch.round(codes).unique().tolist()) <= {-1.0, 0.0, 1.0}, name
        assert max(row.unique().numel() for row in w.reshape(w.shape[0], -1)) <= levels, name


def test_ternary_is_refused_on_per_tensor_weight_backends():
    from quantbench.errors import ConfigError
    from quantbench.qat.prepare import check_compatible

    with pytest.raises(ConfigError, match="per-channel weight scales"):
        check_compatible("ternary", load_backend("snpe"), 3)
