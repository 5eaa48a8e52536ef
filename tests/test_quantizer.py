"""The Quantizer module: observer statistics -> qparams -> fake quantization, and its error paths."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.ao.quantization import PerChannelMinMaxObserver

from quantbench.errors import EmptyCalibrationError, NonFiniteError, QuantbenchError
from quantbench.quant.fake_quant import fake_quantize
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.quantizer import Quantizer
from quantbench.quant.scheme import QScheme


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def calibrate(q: Quantizer, *batches: torch.Tensor) -> Quantizer:
    q.observing, q.quantizing = True, False
    for b in batches:
        assert q(b) is b  # observing alone is a pass-through
    q.observing = False
    q.compute_qparams()
    q.quantizing = True
    return q


def test_fresh_quantizer_is_identity():
    q = Quantizer(QScheme(), "minmax", name="fc")
    x = randn(4, 5)
    assert q(x) is x
    assert not q.calibrated and not q.observing and not q.quantizing


@pytest.mark.parametrize(("scheme", "signed"), [
    (QScheme(bits=8), True),
    (QScheme(bits=4, symmetric=False, signedness="unsigned"), False),
    (QScheme(bits=8, symmetric=False, signedness="signed"), True),
    (QScheme(bits=3, narrow_range=True), True),
    (QScheme(bits=8, scale_type="pow2"), True),
])
def test_per_tensor_quantize_equals_fake_quantize_with_observer_qparams(scheme, signed):
    x1, x2 = randn(8, 3, 5, 5, seed=1), randn(8, 3, 5, 5, seed=2) * 3
    q = calibrate(Quantizer(scheme, "minmax", name="act"), x1, x2)
    scale, zp, qmin, qmax = q.observer.calculate_qparams()
    assert (q.qmin, q.qmax) == (qmin, qmax) == scheme.qrange(signed)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero_point, zp)
    assert scale.shape == (1,)
    for x in (x1, x2, randn(2, 3, 5, 5, seed=3) * 10):
        assert torch.equal(q(x), fake_quantize(x, scale, zp, qmin, qmax))
    # the observer's range is the running min / max over both batches
    both = torch.cat([x1, x2])
    s_ref, z_ref = qparams_from_range(both.min().reshape(1), both.max().reshape(1), qmin, qmax,
                                      scheme.symmetric, scheme.scale_type == "pow2")
    assert torch.equal(scale, s_ref) and torch.equal(zp, z_ref)


def test_quantizer_output_has_gradient_mask():
    q = calibrate(Quantizer(QScheme(bits=4), "minmax", name="w"), randn(100))
    x = (randn(100, seed=5) * 3).requires_grad_(True)
    q(x).sum().backward()
    assert set(x.grad.unique().tolist()) == {0.0, 1.0}


def test_per_channel_conv_weight_axis0_matches_torch():
    w = randn(16, 8, 3, 3, seed=4) * torch.linspace(0.01, 2.0, 16).reshape(-1, 1, 1, 1)
    scheme = QScheme(granularity="per_channel", ch_axis=0)
    q = calibrate(Quantizer(scheme, "minmax", is_weight=True, name="conv1.weight"), w)
    assert q.axis == 0 and q.scale.shape == (16,) and q.zero_point.shape == (16,)
    lo, hi = w.reshape(16, -1).amin(1), w.reshape(16, -1).amax(1)
    s_ref, z_ref = qparams_from_range(lo, hi, -128, 127, symmetric=True)
    assert torch.equal(q.scale, s_ref) and torch.equal(q.zero_point, z_ref)
    out = q(w)
    assert torch.equal(out, fake_quantize(w, s_ref, z_ref, -128, 127, axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        obs(w)
        s_t, z_t = obs.calculate_qparams()
    torch.testing.assert_close(q.scale, s_t.float(), rtol=1e-6, atol=0)
    assert torch.equal(q.zero_point.long(), z_t.long())
    native = torch.fake_quantize_per_channel_affine(w, q.scale, q.zero_point, 0, -128, 127)
    assert torch.equal(out, native)
    # every output filter uses its own step: its error is at most half of it (reached at +max,
    # which eq. 6's s = max|w| / 127.5 puts at 127.5 steps, clamped to 127)
    err = (out - w).abs().reshape(16, -1).amax(1)
    assert torch.all(err <= q.scale * 0.5 * (1 + 1e-4))


def test_per_channel_activation_axis1():
    x = randn(4, 6, 7, 7, seed=8) * torch.tensor([0.1, 1, 5, 0.01, 2, 3]).reshape(1, -1, 1, 1)
    x[:, 2] = x[:, 2].abs()  # one channel non-negative
    scheme = QScheme(granularity="per_channel", ch_axis=1, symmetric=False, signedness="unsigned")
    q = calibrate(Quantizer(scheme, "minmax", name="layer1.relu"), x[:2], x[2:])
    assert q.axis == 1 and q.scale.shape == (6,) and q.zero_point.shape == (6,)
    rows = x.movedim(1, 0).reshape(6, -1)
    s_ref, z_ref = qparams_from_range(rows.amin(1), rows.amax(1), 0, 255, symmetric=False)
    assert torch.equal(q.scale, s_ref) and torch.equal(q.zero_point, z_ref)
    assert q.zero_point[2].item() == 0  # non-negative channel: zero at the bottom of the range
    out = q(x)
    assert torch.equal(out, fake_quantize(x, s_ref, z_ref, 0, 255, axis=1))
    assert torch.equal(out, torch.fake_quantize_per_channel_affine(x, s_ref, z_ref, 1, 0, 255))
    # a per-tensor quantizer would be coarser on the small channels
    pt = calibrate(Quantizer(scheme.model_copy(update={"granularity": "per_tensor"}), "minmax"), x)
    assert (out - x).abs()[:, 3].max() < (pt(x) - x).abs()[:, 3].max()


def test_per_channel_negative_axis_equals_positive_axis():
    x = randn(3, 5, 4, seed=9)
    a = calibrate(Quantizer(QScheme(granularity="per_channel", ch_axis=1), "minmax"), x)
    b = calibrate(Quantizer(QScheme(granularity="per_channel", ch_axis=-2), "minmax"), x)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_adaptive_signedness_unsigned_for_relu_outputs(bits):
    x = torch.relu(randn(8, 4, 6, 6, seed=10))
    q = calibrate(Quantizer(QScheme(bits=bits, signedness="adaptive"), "minmax", name="relu1"), x)
    assert (q.qmin, q.qmax) == (0, 2**bits - 1) and not q.signed
    # symmetric unsigned: s = max / N_max, full resolution on the non-negative side
    assert q.scale.item() == pytest.approx(x.max().item() / (2**bits - 1), rel=1e-6)
    assert torch.equal(q(x), fake_quantize(x, q.scale, q.zero_point, 0, 2**bits - 1))
    assert q(x).min().item() == 0.0


@pytest.mark.parametrize("bits", [4, 8])
def test_adaptive_signedness_signed_for_signed_data(bits):
    x = randn(8, 4, 6, 6, seed=11)
    q = calibrate(Quantizer(QScheme(bits=bits, signedness="adaptive"), "minmax", name="conv2"), x)
    assert (q.qmin, q.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) and q.signed
    assert torch.equal(q(x), fake_quantize(x, q.scale, q.zero_point, q.qmin, q.qmax))


def test_adaptive_signedness_flips_when_any_batch_is_negative():
    relu = torch.relu(randn(100, seed=12))
    neg = relu.clone()
    neg[0] = -1e-3
    q = calibrate(Quantizer(QScheme(signedness="adaptive"), "minmax"), relu, neg)
    assert (q.qmin, q.qmax) == (-128, 127)


def test_quantizing_before_calibration_raises_naming_the_quantizer():
    q = Quantizer(QScheme(), "minmax", name="backbone.layer3.conv2.act")
    q.quantizing = True
    with pytest.raises(QuantbenchError, match=r"backbone\.layer3\.conv2\.act"):
        q(randn(2, 3))
    # also while observing: the first batch cannot be quantized with parameters not yet computed
    q.observing = True
    with pytest.raises(QuantbenchError, match="never calibrated"):
        q(randn(2, 3))


def test_compute_qparams_without_data_raises_empty_calibration():
    q = Quantizer(QScheme(), "minmax", name="head.fc")
    with pytest.raises(EmptyCalibrationError, match=r"head\.fc"):
        q.compute_qparams()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_while_observing_names_the_layer(bad):
    q = Quantizer(QScheme(), "minmax", name="features.3.conv")
    q.observing = True
    x = randn(4, 4)
    x[1, 2] = bad
    with pytest.raises(NonFiniteError, match=r"features\.3\.conv"):
        q(x)
    assert isinstance(NonFiniteError("x"), QuantbenchError)


def test_set_name_renames_observer_messages():
    q = Quantizer(QScheme(granularity="per_channel"), "minmax", name="old")
    q.set_name("model.blocks.0")
    q.observing = True
    x = randn(3, 4)
    x[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.blocks\.0"):
        q(x)


def test_non_finite_is_ignored_when_not_observing():
    q = calibrate(Quantizer(QScheme(), "minmax", name="a"), randn(10))
    q.observing = False
    x = torch.tensor([float("nan"), 1e30, -1e30, 0.0])
    out = q(x)
    assert torch.isnan(out[0]) or out[0].item() in (q.qmin * q.scale.item(), 0.0)
    assert out[1].item() == pytest.approx(q.qmax * q.scale.item())
    assert out[2].item() == pytest.approx(q.qmin * q.scale.item())


@pytest.mark.filterwarnings("ignore::quantbench.observers.base.ClippingWarning")  # the EMA lags on purpose
def test_ema_minmax_observer_option_reaches_observer():
    q = Quantizer(QScheme(), "ema_minmax", name="x", observer_options={"momentum": 0.5})
    assert q.observer.momentum == 0.5
    calibrate(q, torch.tensor([-1.0, 1.0]), torch.tensor([-3.0, 3.0]))
    # EMA with m = 0.5: hi = 0.5 * 1 + 0.5 * 3 = 2
    assert q.scale.item() == pytest.approx(2.0 / 127.5, rel=1e-6)


def test_reset_observer_keeps_observer_options():
    q = Quantizer(QScheme(), "ema_minmax", name="x", observer_options={"momentum": 0.5})
    q.reset_observer()
    assert q.observer.momentum == 0.5


def test_reset_observer_forgets_statistics_and_keeps_name():
    q = calibrate(Quantizer(QScheme(), "minmax", name="conv9"), randn(10) * 100)
    q.reset_observer()
    assert q.observer.n_batches == 0 and q.observer.layer_name == "conv9"
    calibrate(q, randn(10))
    assert q.scale.item() < 0.1


def test_extra_repr_mentions_name_and_state():
    q = Quantizer(QScheme(bits=4), "minmax", name="stem")
    assert "stem" in repr(q) and "uncalibrated" in repr(q)
    calibrate(q, randn(5))
    assert "scale=" in repr(q)


def test_state_dict_roundtrip_restores_per_channel_qparams_and_resolved_range():
    scheme = QScheme(bits=4, symmetric=True, signedness="adaptive", granularity="per_channel", ch_axis=1)
    q = Quantizer(scheme, "minmax", name="act")
    q.observing = True
    q(torch.rand(8, 5, 4, 4))  # non-negative: adaptive resolves to the unsigned range
    q.compute_qparams()
    fresh = Quantizer(scheme, "minmax", name="act")
    fresh.load_state_dict(q.state_dict())
    assert fresh.calibrated and (fresh.qmin, fresh.qmax) == (0, 15)
    assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh.zero_point, q.zero_point)
    x = torch.rand(2, 5, 4, 4)
    q.quantizing = fresh.quantizing = True
    assert torch.equal(q(x), fresh(x))
