"""The deployment-runtime registry: each runtime that is installed runs an exported model and is compared with
the simulation; a runtime that is missing is named with its install command; OpenVINO's float fallback for
asymmetric weights is reported."""

from __future__ import annotations

import sys
from functools import cache

import pytest
import torch
from typer.testing import CliRunner

from quantbench.backends import backend_names, load_backend
from quantbench.cli.main import app
from quantbench.config import PTQConfig
from quantbench.data import make_loader
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.errors import RuntimeUnavailableError
from quantbench.deploy.pipeline import calibrated_model
from quantbench.deploy.runtimes import DEPLOY_RUNTIMES, RuntimeOptions, get_runtime
from tests.conftest import CIFAR, RESNET20, needs_shared

runner = CliRunner()
INSTALLED = [n for n in DEPLOY_RUNTIMES.names() if get_runtime(n).missing() is None]


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@cache
def _exported(backend: str, folder: str):
    """The shared ResNet-20 calibrated W8A8 for ``backend`` and exported, with 256 test images."""
    cfg = PTQConfig(model="resnet20_cifar", weights=str(RESNET20), data=f"cifar10:{CIFAR}", backend=backend,
                    w_observer="minmax", a_observer="minmax", calib_size=64)
    cal = calibrated_model(cfg, progress=False)
    path = export_onnx(cal.gm, cal.example, f"{folder}/{backend}.onnx", artefacts=[]).path
    return cal, path


def _test(cal):
    return make_loader(torch.utils.data.Subset(cal.bundle.test, range(256)), 256)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("runtimes"))


def test_the_registry_has_onnxruntime_openvino_and_tvm_and_the_specs_name_only_those():
    assert {"onnxruntime", "openvino", "tvm"} <= set(DEPLOY_RUNTIMES.names())
    for name in backend_names():  # a spec's faithful_to names registered runtimes
        assert set(load_backend(name).faithful_to) <= set(DEPLOY_RUNTIMES.names()), name
    assert set(load_backend("openvino").faithful_to) == {"openvino"} and not load_backend("academic").faithful_to
    assert "onnxruntime" in INSTALLED  # a hard dependency


@needs_shared
@pytest.mark.parametrize("runtime", INSTALLED)
@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_each_installed_runtime_runs_the_export_in_integer_arithmetic_close_to_the_simulation(runtime, backend,
                                                                                             folder):
    cal, path = _exported(backend, folder)
    r = verify_onnx(path, cal.gm, _test(cal), x64_quant_precision=True, progress=False, runtime=runtime)
    assert r.runtime == runtime and r.runtime_version and r.n == 256
    assert r.agreement >= 0.97 and abs(r.real_top1 - r.sim_top1) <= 1.5, r
    if runtime == "tvm":  # QDQ runs as float fake quantization there: every conv and the linear, said so
        assert not r.int8_complete and len(r.float_ops) == 20 and "fake quantization" in r.float_ops[0]["reason"]
        return
    convs = sum(r.int8_kernels.get(k, 0) for k in ("QLinearConv", "Convolution", "Conv", "convolution"))
    assert convs == 19, r.int8_kernels  # every convolution of ResNet-20 ran in int8
    if runtime == "onnxruntime":  # the simulation models ORT's arithmetic: the same logits up to float noise
        assert r.agreement >= 0.995 and r.int8_kernels == r.kernels_expected, r


@needs_shared
def test_openvino_runs_asymmetric_weight_convolutions_in_float_and_verify_says_so(folder):
    """OpenVINO's CPU plugin has int8 convolutions for symmetric weights only: an fbgemm export (asymmetric
    per-channel weights, non-zero weight zero-points) runs its convolutions in f32 (a float fallback)."""
    if "openvino" not in INSTALLED:
        pytest.skip("OpenVINO is not installed (pip install 'quantbench[openvino]')")
    cal, path = _exported("fbgemm", folder)
    r = verify_onnx(path, cal.gm, _test(cal), progress=False, runtime="openvino")
    assert not r.int8_complete and r.status.startswith("partial-int8")
    assert {f["op"] for f in r.float_ops} == {"Convolution"}
    assert all("f32" in f["reason"] for f in r.float_ops)
    sym, sym_path = _exported("tensorrt", folder)
    r = verify_onnx(sym_path, sym.gm, _test(sym), progress=False, runtime="openvino")
    assert r.int8_kernels.get("Convolution", 0) == 19  # the same network with symmetric weights: int8


@needs_shared
def test_a_missing_runtime_is_named_with_its_install_command(monkeypatch, folder):
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if OpenVINO were not installed
    rt = get_runtime("openvino")
    assert "pip install 'quantbench[openvino]'" in (rt.missing() or "")
    cal, path = _exported("onnxruntime", folder)
    with pytest.raises(RuntimeUnavailableError, match=r"runtime 'openvino' cannot run here.*quantbench\[openvino\]"):
        verify_onnx(path, cal.gm, [torch.zeros(1, *cal.example.shape[1:])], progress=False, runtime="openvino")
    res = runner.invoke(app, ["verify", "--onnx", str(path), "--data", "digits", "--runtime", "nope"])
    assert res.exit_code != 0 and "nope" in res.output and "onnxruntime" in res.output


def _residual_block(path, requantize_conv_branch: bool, seed: int = 1):
    """A QDQ basic block on uint8 activations: x -> conv1+relu -> conv2 [-> Q/DQ] -> + x -> relu -> Q/DQ."""
    import numpy as np
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng, c = np.random.default_rng(seed), 16
    nodes, inits = [], []

    def qdq(name, x, scale, zp=0):
        nodes.extend([h.make_node("QuantizeLinear", [x, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
                      h.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])])
        inits.extend([nh.from_array(np.array(scale, np.float32), f"{name}_s"),
                      nh.from_array(np.array(zp, np.uint8), f"{name}_z")])
        return f"{name}_dq"

    def conv(name, x, sx, relu):
        ws = (rng.random(c) * 0.004 + 0.001).astype(np.float32)
        inits.extend([nh.from_array(rng.integers(-127, 128, (c, c, 3, 3)).astype(np.int8), f"{name}w"),
                      nh.from_array(ws, f"{name}ws"), nh.from_array(np.zeros(c, np.int8), f"{name}wz"),
                      nh.from_array(rng.integers(-3000, 3000, c).astype(np.int32), f"{name}b"),
                      nh.from_array(ws * np.float32(sx), f"{name}bs"),
                      nh.from_array(np.zeros(c, np.int32), f"{name}bz")])
        nodes.extend([h.make_node("DequantizeLinear", [f"{name}w", f"{name}ws", f"{name}wz"], [f"{name}wdq"], axis=0),
                      h.make_node("DequantizeLinear", [f"{name}b", f"{name}bs", f"{name}bz"], [f"{name}bdq"], axis=0),
                      h.make_node("Conv", [x, f"{name}wdq", f"{name}bdq"], [f"{name}o"], pads=[1, 1, 1, 1])])
        if relu:
            nodes.append(h.make_node("Relu", [f"{name}o"], [f"{name}r"]))
        return f"{name}r" if relu else f"{name}o"

    x = qdq("x", "input", 0.03, 60)
    branch = conv("c2", qdq("a", conv("c1", x, 0.03, True), 0.05), 0.05, False)
    if requantize_conv_branch:
        branch = qdq("c2q", branch, 0.06, 90)
    nodes.extend([h.make_node("Add", [branch, x], ["sum"]), h.make_node("Relu", ["sum"], ["sr"])])
    y = qdq("y", "sr", 0.07)
    graph = h.make_graph(nodes, "block", [h.make_tensor_value_info("input", TensorProto.FLOAT, [8, c, 8, 8])],
                         [h.make_tensor_value_info(y, TensorProto.FLOAT, None)], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return np.random.default_rng(seed + 1).standard_normal((8, c, 8, 8)).astype(np.float32) * 1.5


def test_openvino_drops_the_requantization_of_a_conv_fused_with_a_residual_add(tmp_path):
    """The gap behind the openvino spec's placement: with a Q/DQ between conv2 and the add, OpenVINO (which fuses
    the add into conv2) and ONNX Runtime (which requantizes conv2's output first) disagree on many output codes;
    without it (the openvino spec's export) they agree exactly."""
    import numpy as np

    if "openvino" not in INSTALLED:
        pytest.skip("OpenVINO is not installed (pip install 'quantbench[openvino]')")
    ort, ov = get_runtime("onnxruntime"), get_runtime("openvino")
    opts = RuntimeOptions(threads=1, x64_quant_precision=True)
    differing = {}
    for requant in (True, False):
        path = tmp_path / f"block{int(requant)}.onnx"
        x = _residual_block(path, requant)
        a, b = ort.load(path, opts).run(x), ov.load(path, opts).run(x)
        differing[requant] = float(np.mean(np.round((a - b) / 0.07) != 0))
    assert differing[True] > 0.02, differing  # the fused add skips the branch's requantization
    assert differing[False] == 0.0, differing


@needs_shared
def test_tvm_runs_the_power_of_two_tvm_spec_bit_exactly(folder):
    """TVM runs QDQ as float fake quantization; with the tvm spec's power-of-two scales every product and
    rescale is exact in float32, so TVM's logits equal the simulation's bit for bit."""
    if "tvm" not in INSTALLED:
        pytest.skip("Apache TVM is not installed (pip install 'quantbench[tvm]')")
    cal, path = _exported("tvm", folder)
    r = verify_onnx(path, cal.gm, _test(cal), progress=False, runtime="tvm")
    assert r.agreement == 1.0 and r.max_abs_logit_diff == 0.0, r


def test_tensorrt_is_skipped_with_the_reason_without_a_gpu_and_reads_the_engine_inspector():
    """No GPU has been lent: the adapter refuses with the reason here; its inspector parsing is checked on the
    JSON layout TensorRT 10 writes (``get_engine_information``)."""
    from quantbench.deploy.runtimes.tensorrt import report_from_inspector

    rt = get_runtime("tensorrt")
    if not torch.cuda.is_available():
        assert "no CUDA device" in (rt.missing() or "")
        with pytest.raises(RuntimeUnavailableError, match="runtime 'tensorrt' cannot run here"):
            rt.require()
    info = ('{"Layers": [{"Name": "conv1", "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": '
            '"Channel major INT8 format"}], "Outputs": [{"Format/Datatype": "Channel major INT8 format"}]}, '
            '{"Name": "fc", "LayerType": "CaskGemmMatrixMultiply", "Inputs": [{"Format/Datatype": "Row major linear '
            'FP32 format"}], "Outputs": [{"Format/Datatype": "Row major linear FP32 format"}]}, '
            '{"Name": "reformat", "LayerType": "Reformat", "Inputs": [], "Outputs": []}]}')
    report = report_from_inspector(info)
    assert report.integer_ops == {"CaskConvolution": 1} and [f["node"] for f in report.float_ops] == ["fc"]
    assert report.all_ops["Reformat"] == 1
