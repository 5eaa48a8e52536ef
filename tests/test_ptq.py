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
