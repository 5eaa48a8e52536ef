"""BN-folding strategies: training math equals float BN, eval equals the BN-folded quantized layer, and the QAT
graph starts as the PTQ graph it came from."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.backends import load_backend
from quantbench.errors import ConfigError
from quantbench.graph.bnfold import BN_FOLD, set_bn_fold
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.quantize import prepare
from quantbench.models import build_model
from quantbench.ptq import calibrate
from quantbench.qat.prepare import check_compatible, prepare_qat, qat_layers
from quantbench.quant.fake_quant import fake_quantize
from quantbench.quant.quantizer import Quantizer
from quantbench.quant.scheme import QScheme

PC4 = QScheme(bits=4, symmetric=True, signedness="signed", granularity="per_channel")


def conv_bn(seed: int = 0) -> QuantWeighted:
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    q = Quantizer(PC4, "minmax", True, "w")
    layer = QuantWeighted(conv, q, bn)
    q.observing = True
    q(layer.folded_weight_bias()[0].detach())
    q.compute_qparams()
    q.observing, q.quantizing = False, True
    return layer


def qat_layer(strategy: int, algorithm: str = "lsq", freeze: int | None = None):  # type: ignore[no-untyped-def]
    """A calibrated PTQ layer switched in place to BN-fold ``strategy`` with a learning weight quantizer."""
    layer = conv_bn()
    m = copy.deepcopy(layer)
    factor = BN_FOLD[strategy].quantizer_input_factor(m)
    set_bn_fold(m, strategy, freeze)
    q = m.weight_quantizer
    q.enable_learning(algorithm, None, hardware=True, init_scale=None if factor is None else q.scale / factor)
    return m, layer


X = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("strategy", [1, 2, 3, 4])
def test_training_forward_without_quantization_is_float_batch_norm(strategy: int) -> None:
    m, layer = qat_layer(strategy)
    m.weight_quantizer.quantizing = False
    ref_bn = copy.deepcopy(layer.bn).train()
    ref = ref_bn(layer.module(X))
    m.train()
    torch.testing.assert_close(m(X), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bn.running_mean, ref_bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.bn.running_var, ref_bn.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strategy", [0, 1, 2, 3, 4])
def test_eval_after_training_is_the_bn_folded_quantized_layer(strategy: int) -> None:
    m, _ = qat_layer(strategy, freeze=2)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    m.train()
    for i in range(4):
        opt.zero_grad()
        m(X * (1 + 0.1 * i)).square().mean().backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        out = m(X)
        s, z = m.weight_quantizer.rule.export_qparams()
        w = m.module.weight.double()
        if m.bn is None:  # strategy 0: the folded weight and bias are the parameters
            w_fold, b_fold, s_fold = w, m.module.bias.double(), s
        else:
            bn = m.bn
            f = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            w_fold = w * f.reshape(-1, 1, 1, 1)
            b_fold = bn.bias.double() - bn.running_mean.double() * f
            s_fold = s * f.abs().float() if strategy == 4 else s
        wq = fake_quantize(w_fold, s_fold.double(), z.round().int(), -8, 7, axis=0)
        ref = F.conv2d(X.double(), wq, b_fold, padding=1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_strategy_2_freezes_statistics_after_the_configured_step() -> None:
    m, _ = qat_layer(2, freeze=1)
    m.train()
    m(X)
    frozen = m.bn.running_var.clone()
    m(X * 3)
    torch.testing.assert_close(m.bn.running_var, frozen)


def _fake_quant_spec(name: str):  # type: ignore[no-untyped-def]
    return load_backend(name).configure(w_bits=4, a_bits=8).model_copy(update={"arithmetic": "fake_quant"})


@pytest.mark.parametrize("strategy", [0, 1, 2, 3, 4])
def test_qat_graph_starts_as_the_ptq_graph(strategy: int) -> None:
    torch.manual_seed(0)
    model = build_model("digits_cnn").train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(16, 1, 8, 8))
    model.eval()
    x = torch.randn(32, 1, 8, 8)
    gm = prepare(model, _fake_quant_spec("fbgemm"), x[:1], "minmax", "minmax")
    calibrate(gm, [x], progress=False)
    with torch.no_grad():
        ref = gm(x)
    qat = prepare_qat(copy.deepcopy(gm), "fixed", strategy)
    assert len(list(qat_layers(qat))) == 5
    qat.eval()
    with torch.no_grad():
        torch.testing.assert_close(qat(x), ref, rtol=1e-4, atol=1e-4)


def test_bad_combinations_are_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="academic setting"):
        check_compatible("apot", load_backend("tensorrt"), 3)
    check_compatible("apot", load_backend("academic"), 3)
    with pytest.raises(ConfigError, match="per tensor"):
        check_compatible("lsq", load_backend("snpe"), 4)
    with pytest.raises(ConfigError, match="power-of-two"):
        check_compatible("dorefa", load_backend("tvm"), 3)
    check_compatible("dsq", load_backend("tvm"), 3)
    with pytest.raises(ConfigError, match="bn-fold"):
        check_compatible("lsq", load_backend("tensorrt"), 7)
