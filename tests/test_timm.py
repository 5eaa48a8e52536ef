"""timm models as ``timm:NAME``: entries from timm's configs, random init or local weights, five families that
prepare, calibrate and run on the onnxruntime and tensorrt specs, clear errors, and ``models --timm``."""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from quantbench.backends import load_backend
from quantbench.cli.main import app
from quantbench.errors import ConfigError
from quantbench.graph import requant
from quantbench.graph.quantize import prepare, set_quantizing
from quantbench.models import build_model, get_entry, save_weights
from quantbench.models.timm_models import family_of
from quantbench.ptq.calibrate import calibrate
from tests.test_smoke_grid import check_prepares_calibrates_and_runs

pytest.importorskip("timm", reason="timm is not installed (pip install 'quantbench[timm]')")

#: one small model per family the issue names: resnet, efficientnet, mobilenetv3, regnet, convnext (LayerNorm)
FAMILIES = ["resnet10t", "efficientnet_lite0", "mobilenetv3_small_050", "regnetx_002", "convnext_atto"]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_a_timm_entry_takes_input_size_normalisation_and_family_from_timm():
    e = get_entry("timm:convnext_atto")
    assert (e.name, e.input_size, e.num_classes, e.family) == ("timm:convnext_atto", (3, 224, 224), 1000, "timm")
    assert e.mean == pytest.approx((0.485, 0.456, 0.406)) and e.std == pytest.approx((0.229, 0.224, 0.225))
    assert [family_of(n) for n in FAMILIES] == ["resnet", "efficientnet", "mobilenet", "regnet", "timm"]
    assert get_entry("timm:resnet10t") is get_entry("timm:resnet10t")  # built once


def test_unknown_timm_names_width_mult_and_a_missing_timm_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match=r"timm has no model 'resnet1Ot'.*resnet10t.*quantbench models --timm"):
        get_entry("timm:resnet1Ot")
    with pytest.raises(ConfigError, match="takes no width_mult"):
        build_model("timm:resnet10t", width_mult=0.5)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"pip install 'quantbench\[timm\]'"):
        get_entry("timm:not_cached_yet")


def test_weights_come_from_a_local_file_and_nothing_else(tmp_path):
    torch.manual_seed(0)
    a = build_model("timm:resnet10t", num_classes=10)
    save_weights(a, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    b = build_model("timm:resnet10t", weights=str(tmp_path / "w.safetensors"), num_classes=10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("name", FAMILIES)
def test_timm_families_prepare_calibrate_and_run(name, backend):
    check_prepares_calibrates_and_runs(f"timm:{name}", backend, (3, 64, 64))


def test_a_model_fx_cannot_trace_names_the_failing_call_and_the_fix():
    model = build_model("timm:mobilevit_xxs", num_classes=10)
    with pytest.raises(Exception, match=r"(?s)cannot trace ByobNet.*failing call: .*mobilevit.py.*fix: .*leaf_modules"):
        prepare(model, load_backend("tensorrt"), torch.randn(1, 3, 64, 64))


class _Tokens(nn.Module):
    """Linear layers over (N, L, F) tokens, as in a transformer's MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_the_integer_kernel_gives_each_token_what_it_gives_that_token_alone():
    """ORT's integer Linear kernel on (N, L, F) tokens: per-channel bias and requantization on the last axis
    (it used to broadcast them over dim 1), checked against the same tokens as an (N*L, F) batch."""
    torch.manual_seed(0)
    gm = prepare(_Tokens(), load_backend("onnxruntime"), torch.randn(1, 5, 8))
    x = torch.randn(3, 5, 8)
    calibrate(gm, [(x, torch.zeros(3))], progress=False)
    set_quantizing(gm, True)
    with mock.patch.object(requant, "integer_weighted", wraps=requant.integer_weighted) as kernel, torch.no_grad():
        tokens = gm(x)
        assert kernel.call_count >= 1  # the fused integer path ran (fc1: input and output quantized)
        flat = gm(x.reshape(15, 8)).reshape(3, 5, -1)
    assert tokens.shape == (3, 5, 4) and torch.equal(tokens, flat)


def test_models_lists_timm_models_by_glob():
    res = CliRunner().invoke(app, ["models", "--timm", "convnext_a*"])
    assert res.exit_code == 0, res.output
    assert "timm:convnext_atto " in res.output and "3 (random init" in res.output.replace("\n", " ")
