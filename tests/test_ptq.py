"""PTQ: BN folding is exact, BN re-calibration matches a direct computation, bad input is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.backends import load_backend
from quantbench.errors import EmptyCalibrationError, NonFiniteError, TraceError
from quantbench.graph.quantize import prepare, set_quantizing
from quantbench.models import build_model
from quantbench.ptq import bn_recalibrate, calibrate


def _trained_like(model: nn.Module) -> nn.Module:
    """Random but non-trivial BN statistics so folding is actually exercised."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("backend", ["tensorrt", "academic", "acl"])
def test_prepared_model_with_quantization_off_equals_float_model(backend):
    model = _trained_like(build_model("resnet20_cifar"))
    x = torch.randn(8, 3, 32, 32)
    gm = prepare(model, load_backend(backend), x[:1])
    set_quantizing(gm, False)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)


def test_w8a8_simulation_stays_close_to_float():
    model = _trained_like(build_model("resnet20_cifar"))
    x = torch.randn(64, 3, 32, 32)
    gm = prepare(model, load_backend("tensorrt"), x[:1], "minmax", "minmax")
    calibrate(gm, [(x, None)], progress=False)
    ref, out = model(x), gm(x)
    assert (out - ref).norm() / ref.norm() < 0.05


def _reference_bn_stats(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """Seed 001 C.3 by hand: BNs normalise with batch statistics; each BN's new running statistics
    are the average over batches of its input's per-channel mean and unbiased variance."""
    model = copy.deepcopy(model)
    per_batch: dict[str, list] = {}

    def hook(mod, inp, out, name):
        xin = inp[0].detach().double()
        per_batch.setdefault(name, []).append((xin.mean((0, 2, 3)), xin.var((0, 2, 3), unbiased=True)))

    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.register_forward_hook(lambda mod, i, o, n=name: hook(mod, i, o, n))
    with torch.no_grad():
        for x in batches:
            model(x)
    return {n: (torch.stack([m for m, _ in v]).mean(0), torch.stack([v_ for _, v_ in v]).mean(0))
            for n, v in per_batch.items()}


def test_bn_recalibration_unfolded_matches_hand_computed_statistics():
    """Academic (BN kept, W4A4): re-calibrated running stats equal the averaged batch statistics of
    each BN's input on the quantized model."""
    model = _trained_like(build_model("resnet20_cifar"))
    batches = [torch.randn(32, 3, 32, 32), torch.randn(32, 3, 32, 32) * 1.5]
    gm = prepare(model, load_backend("academic").configure(w_bits=4, a_bits=4), batches[0][:1], "minmax", "minmax")
    calibrate(gm, [(b, None) for b in batches], progress=False)
    ref = _reference_bn_stats(gm, batches)
    bn_recalibrate(gm, [(b, None) for b in batches], progress=False)
    bns = {n: m for n, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bns) == 19
    for name, bn in bns.items():
        torch.testing.assert_close(bn.running_mean.double(), ref[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), ref[name][1], rtol=1e-4, atol=1e-5)


def test_bn_recalibration_folded_with_quantization_off_matches_float_model():
    """Folded layers (TensorRT): with fake quantization off, re-estimated statistics equal those of
    the float model's BNs computed by hand."""
    model = _trained_like(build_model("resnet20_cifar"))
    batches = [torch.randn(32, 3, 32, 32), torch.randn(32, 3, 32, 32)]
    ref = _reference_bn_stats(model, batches)
    gm = prepare(model, load_backend("tensorrt"), batches[0][:1])
    calibrate(gm, [(b, None) for b in batches], progress=False)
    set_quantizing(gm, False)
    assert bn_recalibrate(gm, [(b, None) for b in batches], progress=False) == 19
    for name, m in gm.named_modules():
        if getattr(m, "bn", None) is not None:
            mean, var = ref[name.replace("conv", "bn")]
            torch.testing.assert_close(m.bn.running_mean.double(), mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(m.bn.running_var.double(), var, rtol=1e-3, atol=1e-4)


def test_bn_recalibration_changes_folded_weight_quantization():
    model = _trained_like(build_model("resnet20_cifar"))
    x = torch.randn(32, 3, 32, 32)
    gm = prepare(model, load_backend("tensorrt").configure(w_bits=4, a_bits=4), x[:1], "minmax", "minmax")
    calibrate(gm, [(x, None)], progress=False)
    before = gm.get_submodule("layer1.0.conv1").weight_quantizer.scale.clone()
    bn_recalibrate(gm, [(x, None)], progress=False)
    after = gm.get_submodule("layer1.0.conv1").weight_quantizer.scale
    assert not torch.equal(before, after)  # folded weight depends on the new running variance


def test_empty_calibration_set_is_refused():
    model = build_model("resnet20_cifar")
    gm = prepare(model, load_backend("tensorrt"), torch.randn(1, 3, 32, 32))
    with pytest.raises(EmptyCalibrationError, match="empty"):
        calibrate(gm, [], progress=False)


def test_nan_reaching_an_observer_names_the_layer():
    model = build_model("resnet20_cifar")
    model.layer2[0].bn1.running_var.fill_(-1.0)  # sqrt of a negative variance: NaN from here on
    gm = prepare(model, load_backend("tensorrt"), torch.randn(1, 3, 32, 32))
    with pytest.raises(NonFiniteError, match="layer2"):
        calibrate(gm, [(torch.randn(4, 3, 32, 32), None)], progress=False)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return F.relu(self.conv(x))
        return self.conv(x)


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Untraceable()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.inner(x).mean((2, 3)))


def test_untraceable_model_names_the_call_and_the_leaf_fix():
    with pytest.raises(TraceError) as info:
        prepare(_Wrapper(), load_backend("tensorrt"), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "x.sum() > 0" in msg and "leaf_modules" in msg


def test_leaf_module_makes_an_untraceable_model_work():
    gm = prepare(_Wrapper(), load_backend("tensorrt"), torch.randn(1, 3, 8, 8), leaf_modules=[_Untraceable])
    calibrate(gm, [(torch.randn(4, 3, 8, 8), None)], progress=False)
    assert gm(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_prepared_model_can_be_moved_and_cast():
    """nn.Module.to()/double() must reach every submodule (a layer method named _apply once broke this)."""
    model = _trained_like(build_model("resnet20_cifar"))
    x = torch.randn(4, 3, 32, 32)
    gm = prepare(model, load_backend("tensorrt"), x[:1])
    set_quantizing(gm, False)
    gm = gm.to(torch.float64)
    assert gm.get_submodule("layer1.0.conv1").module.weight.dtype == torch.float64
    torch.testing.assert_close(gm(x.double()).float(), model(x), rtol=1e-4, atol=1e-4)


def test_bn_recalibration_of_folded_layers_quantizes_with_statistics_that_describe_them():
    """Folded layers (TensorRT W8A8) quantize W * gamma / sqrt(running_var) with the weight scale calibrated for
    that fold. Re-calibration must not fold the reset statistics (var = 1) into its first batch: on statistics far
    from 1 the weight quantizer then clips (or rounds away) the folded weight, and that batch's statistics, a
    quarter to a half of the average, are those of a broken network. The re-calibrated statistics of the
    quantized network must match the float model's on the same batches (8-bit quantization error only)."""
    model = build_model("resnet20_cifar")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 3, 32, 32, generator=g) * 4.0 for _ in range(2)]
    for m in model.modules():  # running statistics that describe these inputs (variances far from 1)
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()
    ref = _reference_bn_stats(model, batches)
    gm = prepare(model, load_backend("tensorrt").configure(w_bits=8, a_bits=8), batches[0][:1], "minmax", "minmax")
    calibrate(gm, [(b, None) for b in batches], progress=False)
    assert bn_recalibrate(gm, [(b, None) for b in batches], progress=False) == 19
    far = 0
    for name, m in gm.named_modules():
        if getattr(m, "bn", None) is not None:
            mean, var = ref[name.replace("conv", "bn").replace("downsample.0", "downsample.1")]
            far += int(float(var.max()) > 4.0 or float(var.min()) < 0.25)
            torch.testing.assert_close(m.bn.running_var.double(), var, rtol=0.05, atol=1e-3)
            torch.testing.assert_close(m.bn.running_mean.double(), mean, rtol=0.05, atol=0.05)
    assert far >= 3  # the statistics really are far from the reset ones


def test_bn_recalibration_images_are_the_calibration_images_under_the_training_augmentation():
    from quantbench.config import PTQConfig
    from quantbench.data import calibration_subset, load_data
    from quantbench.models import get_entry
    from quantbench.ptq.pipeline import bn_calibration_set

    entry = get_entry("digits_cnn")
    bundle = load_data("digits", entry.mean, entry.std, entry.input_size)
    cfg = PTQConfig(model="digits_cnn", data="digits", calib_size=64, bn_calib=True)
    calib = calibration_subset(bundle, 64, cfg.seed)
    torch.manual_seed(0)
    bn_set = bn_calibration_set(cfg, bundle, calib, (1, 8, 8))
    x = torch.stack([calib[i][0] for i in range(64)])
    xb = torch.stack([bn_set[i][0] for i in range(64)])
    assert [calib[i][1] for i in range(64)] == [bn_set[i][1] for i in range(64)]  # the same images ...
    assert not torch.equal(x, xb)  # ... shifted by the training augmentation (digits: 1 pixel, no flip)
    shifted = (x != xb).flatten(1).any(1)
    assert 0 < int(shifted.sum()) < 64  # some draws are the identity crop
    plain = cfg.model_copy(update={"bn_calib_augment": False})
    assert bn_calibration_set(plain, bundle, calib, (1, 8, 8)) is calib
    more = cfg.model_copy(update={"bn_calib_size": 96})
    assert len(bn_calibration_set(more, bundle, calib, (1, 8, 8))) == 96
