"""Model registry, CIFAR ResNets vs the ../shared checkpoints, tracing and checkpoint errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantbench.errors import CheckpointError, ConfigError, UnknownNameError
from quantbench.models import MODELS, ModelEntry, build_model, get_entry, load_weights
from quantbench.models.cifar_resnet import LambdaShortcutA
from quantbench.models.small_cnn import DIGITS_MEAN, DIGITS_STD
from quantbench.models.weights import save_weights

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS_DIR = SHARED / "models"
CIFAR_DIR = SHARED / "data" / "cifar10"
needs_shared = pytest.mark.skipif(
    not (MODELS_DIR.is_dir() and CIFAR_DIR.is_dir()),
    reason=f"shared data/models not found at {SHARED} (clone the repo with ../shared beside it)",
)
TORCHVISION = {
    "resnet18",
    "resnet34",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "densenet121",
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def cifar_test() -> tuple[torch.Tensor, torch.Tensor]:
    from quantbench.data import load_data

    entry = get_entry("resnet20_cifar")
    bundle = load_data(f"cifar10:{CIFAR_DIR}", entry.mean, entry.std, entry.input_size)
    return bundle.test.images, bundle.test.labels  # type: ignore[attr-defined]


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        pred = torch.cat([model(x).argmax(1) for x in images.split(256)])
    return 100.0 * (pred == labels).double().mean().item()


# ------------------------------------------------------------------------------- pretrained CIFAR
@needs_shared
@pytest.mark.parametrize("depth", [20, 32])
def test_cifar_resnet_keys_match_checkpoint(depth: int) -> None:
    ckpt = load_file(str(MODELS_DIR / f"resnet{depth}_cifar10.safetensors"))
    model = build_model(f"resnet{depth}_cifar")
    assert set(model.state_dict()) == set(ckpt)
    for k, v in ckpt.items():
        assert model.state_dict()[k].shape == v.shape, k


@needs_shared
def test_resnet20_fp32_accuracy(cifar_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = build_model("resnet20_cifar", weights=str(MODELS_DIR / "resnet20_cifar10.safetensors"))
    assert not model.training
    assert top1(model, *cifar_test) == pytest.approx(91.63, abs=0.05)


@needs_shared
def test_resnet32_fp32_accuracy(cifar_test: tuple[torch.Tensor, torch.Tensor]) -> None:
    model = build_model("resnet32_cifar", weights=str(MODELS_DIR / "resnet32_cifar10.safetensors"))
    assert top1(model, *cifar_test) == pytest.approx(93.03, abs=0.05)


# ------------------------------------------------------------------------------------ architecture
def test_param_counts() -> None:
    assert n_params(build_model("resnet20_cifar")) == 269_722
    assert n_params(build_model("resnet18")) / 1e6 == pytest.approx(11.69, abs=0.005)
    assert n_params(build_model("mobilenet_v2")) / 1e6 == pytest.approx(3.50, abs=0.005)


def test_width_mult_scales_params() -> None:
    full = n_params(build_model("resnet20_cifar"))
    half = build_model("resnet20_cifar", width_mult=0.5)
    assert 3.5 < full / n_params(half) < 4.5
    assert half.conv1.out_channels == 8 and half.linear.in_features == 32  # type: ignore[union-attr]
    tiny = build_model("resnet20_cifar", width_mult=0.01)  # widths clamp at 1
    assert tiny.conv1.out_channels == 1  # type: ignore[union-attr]
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mb = build_model("mobilenet_v2", width_mult=0.5, num_classes=10)
    assert n_params(mb) < n_params(build_model("mobilenet_v2", num_classes=10))
    digits_half = build_model("digits_cnn", width_mult=0.5)
    assert n_params(digits_half) < n_params(build_model("digits_cnn"))


def test_width_mult_unsupported_and_invalid() -> None:
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        build_model("resnet18", width_mult=0.5)
    with pytest.raises(ConfigError, match="width_mult"):
        build_model("resnet20_cifar", width_mult=0.0)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet20_cifar", num_classes=0)


def test_option_a_shortcut_pads_equally() -> None:
    sc = LambdaShortcutA(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :8], torch.zeros(2, 8, 4, 4))
    assert torch.equal(y[:, 24:], torch.zeros(2, 8, 4, 4))
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])


def test_entries_metadata() -> None:
    e = get_entry("resnet20_cifar")
    assert isinstance(e, ModelEntry)
    assert (e.input_size, e.num_classes, e.family) == ((3, 32, 32), 10, "resnet")
    assert e.mean == (0.485, 0.456, 0.406) and e.std == (0.229, 0.224, 0.225)
    assert get_entry("densenet121").family == "densenet"
    assert get_entry("resnet50").input_size == (3, 224, 224) and get_entry("resnet50").num_classes == 1000
    d = get_entry("digits_cnn")
    assert (d.input_size, d.family, len(d.mean)) == ((1, 8, 8), "small", 1)
    assert {f"resnet{k}_cifar" for k in (20, 32, 44, 56)} | TORCHVISION | {"digits_cnn"} <= set(MODELS.names())


def test_digits_normalization_constants() -> None:
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float64) / 16.0
    assert DIGITS_MEAN[0] == pytest.approx(float(x.mean()), abs=1e-12)
    assert DIGITS_STD[0] == pytest.approx(float(x.std()), abs=1e-12)


def test_digits_cnn_structure() -> None:
    model = build_model("digits_cnn")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    gm = torch.fx.symbolic_trace(model)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert adds, "digits_cnn must contain a residual add"
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_and_traces(name: str) -> None:
    entry = get_entry(name)
    model = build_model(name, num_classes=7)
    gm = torch.fx.symbolic_trace(model)
    c, h, w = entry.input_size
    if name in TORCHVISION:  # small resolution keeps the big ones fast
        h = w = 64
    x = torch.randn(2, c, h, w)
    with torch.inference_mode():
        ref, out = model(x), gm(x)
    assert ref.shape == (2, 7)
    torch.testing.assert_close(out, ref)
    if name == "densenet121":
        assert any(n.target is torch.cat for n in gm.graph.nodes)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_model("resnet21_cifar")
    msg = str(info.value)
    assert "resnet21_cifar" in msg and "resnet20_cifar" in msg and "mobilenet_v2" in msg
    with pytest.raises(KeyError):  # UnknownNameError is also a KeyError
        get_entry("nope")


# -------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def r20_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model("resnet20_cifar").state_dict().items()}


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    src = build_model("resnet20_cifar")
    path = save_weights(src, tmp_path / "sub" / "m.safetensors")
    dst = load_weights(build_model("resnet20_cifar"), path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_wrong_keys_listed(tmp_path: Path, r20_state: dict[str, torch.Tensor]) -> None:
    r20_state["stem.weight"] = r20_state.pop("conv1.weight")
    r20_state["extra.bias"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(r20_state, str(path))
    with pytest.raises(CheckpointError) as info:
        load_weights(build_model("resnet20_cifar"), path)
    msg = str(info.value)
    assert "1 missing" in msg and "conv1.weight" in msg
    assert "2 unexpected" in msg and "stem.weight" in msg and "extra.bias" in msg
    assert "Fix" in msg


def test_many_missing_keys_truncated(tmp_path: Path) -> None:
    path = tmp_path / "small.safetensors"
    save_file({"linear.bias": torch.zeros(10)}, str(path))
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*more"):
        load_weights(build_model("resnet20_cifar"), path)


def test_shape_mismatch(tmp_path: Path, r20_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "r20.safetensors"
    save_file(r20_state, str(path))
    with pytest.raises(CheckpointError) as info:
        build_model("resnet20_cifar", weights=str(path), num_classes=100)
    msg = str(info.value)
    assert "2 tensor(s)" in msg and "'linear.weight': checkpoint (10, 64) vs model (100, 64)" in msg
    assert "'linear.bias': checkpoint (10,) vs model (100,)" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=r"nope\.safetensors"):
        load_weights(build_model("resnet20_cifar"), path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported checkpoint extension"):
        load_weights(build_model("resnet20_cifar"), path)


def test_torch_checkpoint_weights_only(tmp_path: Path, r20_state: dict[str, torch.Tensor]) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(r20_state, plain)
    model = load_weights(build_model("resnet20_cifar"), plain)
    assert torch.equal(model.state_dict()["linear.weight"], r20_state["linear.weight"])
    # nested under "state_dict", DataParallel "module." prefix, num_batches_tracked absent
    nested = {
        "state_dict": {f"module.{k}": v for k, v in r20_state.items() if "num_batches" not in k},
        "epoch": 3,
    }
    path = tmp_path / "nested.pth"
    torch.save(nested, path)
    model = load_weights(build_model("resnet20_cifar"), path)
    assert torch.equal(model.state_dict()["conv1.weight"], r20_state["conv1.weight"])
    torch.save({"model": r20_state}, tmp_path / "m.ckpt")
    load_weights(build_model("resnet20_cifar"), tmp_path / "m.ckpt")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.fault(input="--weights a .pt holding a pickled object (os.system payload)", exit_code=2,
                   message="refusing or unable to load PATH: it holds a pickled object (GLOBAL "
                           "posix.system), not only tensors; save the weights as .safetensors ... or as a plain "
                           "state dict", kept="nothing executed")
def test_torch_checkpoint_with_pickled_object_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"pickled object \(GLOBAL \S*system\)") as exc:
        load_weights(build_model("resnet20_cifar"), path)
    assert not marker.exists()
    message = str(exc.value)
    assert "safetensors" in message and "state_dict()" in message  # the safe alternatives
    assert "False" not in message and "add_safe_globals" not in message and "trust" not in message  # no unsafe hint


@pytest.mark.fault(input="qat --resume onto a checkpoint.pt holding a pickled object", exit_code=2,
                   message="cannot read QAT checkpoint PATH: it holds a pickled object (...), not only tensors; ...",
                   kept="nothing executed")
def test_qat_checkpoint_errors_never_suggest_unsafe_loading(tmp_path: Path) -> None:
    from quantbench.qat.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "quantbench-qat/1", "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled object") as exc:
        load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only" not in str(exc.value) and "False" not in str(exc.value)


def test_non_tensor_entries_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"conv1.weight": torch.zeros(1), "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_weights(build_model("resnet20_cifar"), path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_weights(build_model("resnet20_cifar"), path)
