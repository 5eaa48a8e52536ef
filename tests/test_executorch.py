"""The ``executorch`` runtime (ExecuTorch + XNNPACK delegate): an exported QDQ model rebuilt in PT2E form, lowered
and run; what XNNPACK ran in int8 is reported; asymmetric weights fall back to fp32 with the reason; skipped with
the install command when ExecuTorch is not installed."""

from __future__ import annotations

import sys

import pytest
import torch

from quantbench.backends import load_backend
from quantbench.deploy import verify_onnx
from quantbench.deploy.errors import RuntimeUnavailableError
from quantbench.deploy.runtimes import get_runtime
from tests.test_torch_arithmetic import _exported

pytestmark = pytest.mark.usefixtures("torch_one_thread")
MISSING = get_runtime("executorch").missing()
needs_executorch = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@needs_executorch
def test_executorch_runs_convs_adds_and_the_pool_as_xnnpack_int8_close_to_the_simulation(tmp_path):
    gm, path, data = _exported(tmp_path, load_backend("tensorrt"), seed=3)
    r = verify_onnx(path, gm, data, progress=False, runtime="executorch")
    assert r.runtime == "executorch" and r.runtime_version
    assert r.int8_kernels == {"add": 1, "convolution": 3, "mean": 1}, r.int8_kernels
    assert [f["op"] for f in r.float_ops] == ["linear"] and "not re-quantized" in r.float_ops[0]["reason"]
    assert r.agreement >= 0.95, r  # XNNPACK's QS8 requantization and add are not modelled: close, not exact
    with torch.no_grad():
        assert r.max_abs_logit_diff <= 0.1 * float(gm(data[0][0]).abs().max())


@needs_executorch
def test_executorch_gives_asymmetric_weights_to_xnnpack_as_float_and_says_so(tmp_path):
    gm, path, data = _exported(tmp_path, load_backend("fbgemm"), seed=4)
    r = verify_onnx(path, gm, data, progress=False, runtime="executorch")
    convs = [f for f in r.float_ops if f["op"] == "convolution"]
    assert len(convs) == 3 and "asymmetric weights" in convs[0]["reason"] and "convolution" not in r.int8_kernels
    assert r.agreement >= 0.95, r


def test_a_missing_executorch_is_named_with_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "executorch.runtime", None)
    rt = get_runtime("executorch")
    assert "pip install 'quantbench[executorch]'" in (rt.missing() or "")
    with pytest.raises(RuntimeUnavailableError, match=r"runtime 'executorch' cannot run here"):
        rt.require()


@needs_executorch
def test_a_narrow_range_exported_as_clip_becomes_the_quantizers_code_range(tmp_path):
    """The x86 spec's 7-bit activations are exported as Clip -> QuantizeLinear; given to XNNPACK as a clamp, the
    convolutions were not delegated and the portable path returned wrong logits (9.6 % agreement on ResNet-20).
    As quantize_per_tensor's quant_min / quant_max the pattern is QS8 and right."""
    gm, path, data = _exported(tmp_path, load_backend("x86"), seed=5)
    r = verify_onnx(path, gm, data, progress=False, runtime="executorch")
    assert r.int8_kernels.get("convolution") == 3 and r.agreement >= 0.95, r
    with torch.no_grad():
        assert r.max_abs_logit_diff <= 0.1 * float(gm(data[0][0]).abs().max())


class _ReLU6Net(torch.nn.Module):
    """conv -> ReLU6 -> conv -> pool -> linear: with 7-bit activations the export chains two Clips before the
    QuantizeLinear (ReLU6's and the narrow range's)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.c1(x))
        y = torch.nn.functional.relu6(self.c2(y))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


@needs_executorch
def test_a_chain_of_clips_before_a_quantizer_becomes_one_code_range(tmp_path):
    """MobileNetV2 on the x86 spec ran 17/52 convolutions in int8 at 2 s per batch until chained Clips (ReLU6, then
    the 7-bit range) were folded together."""
    from quantbench.deploy import export_onnx
    from quantbench.graph.quantize import prepare
    from quantbench.ptq import calibrate

    torch.manual_seed(0)
    x = torch.randn(32, 3, 12, 12)
    gm = prepare(_ReLU6Net().eval(), load_backend("x86"), x[:1], "minmax", "minmax")
    calibrate(gm, [(x, None)], progress=False)
    path = export_onnx(gm, x[:1], tmp_path / "relu6.onnx", artefacts=[]).path
    r = verify_onnx(path, gm, [x], progress=False, runtime="executorch")
    assert r.int8_kernels.get("convolution") == 2 and r.agreement >= 0.95, r
