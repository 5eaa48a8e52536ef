"""QDQ export: the exporter choice, the graph matches the simulation's quantizers one to one, narrow ranges,
refusals, and ONNX Runtime agrees with the simulation for every deployable backend (random weights)."""

from __future__ import annotations

import io
import sys
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from quantbench.backends import backend_names, load_backend
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.errors import ExportError
from quantbench.deploy.metadata import read_metadata
from quantbench.graph import requant, torch_engines
from quantbench.graph.quantize import activation_quantizers, prepare, weight_layers
from quantbench.models import build_model
from quantbench.ptq import calibrate

DEPLOYABLE = [b for b in backend_names() if load_backend(b).deployable]
SIZE = 32
GEN = torch.Generator().manual_seed(1)
CALIB = torch.randn(16, 3, SIZE, SIZE, generator=GEN)
TEST = torch.randn(32, 3, SIZE, SIZE, generator=GEN)


def trained_like(model: nn.Module) -> nn.Module:
    """Random but non-trivial BN statistics so folding is exercised."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@cache
def float_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    width = 0.5 if name == "mobilenet_v2" else 1.0
    return trained_like(build_model(name, num_classes=10, width_mult=width))


def calibrated(name: str, backend: str, **configure):
    spec = load_backend(backend).configure(**configure) if configure else load_backend(backend)
    gm = prepare(float_model(name), spec, CALIB[:1], "minmax", "minmax")
    calibrate(gm, [(CALIB, None)], progress=False)
    return gm


@cache
def exported(name: str, backend: str, tmp: str, reduce_range: bool = False) -> tuple[object, Path, dict]:
    gm = calibrated(name, backend, reduce_range=True) if reduce_range else calibrated(name, backend)
    path = Path(tmp) / f"{name}_{backend}{'_rr' if reduce_range else ''}.onnx"
    res = export_onnx(gm, CALIB[:1], path)
    return gm, path, res.record


@pytest.fixture(scope="module")
def tmpdir_module(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("export"))


# ------------------------------------------------------------------------------------ exporter choice
def test_exporter_is_torchscript_and_needs_no_onnxscript(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # importing it would fail, as in a bare install
    gm = calibrated("resnet20_cifar", "onnxruntime")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = export_onnx(gm, CALIB[:1], tmp_path / "m.onnx")
    assert res.record["exporter"]["name"] == "torchscript" and "dynamo=False" in res.record["exporter"]["call"]
    assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], "the exporter notice leaked"
    model = onnx.load(str(res.path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 13
    onnx.checker.check_model(model, full_check=True)


def test_opset_outside_13_to_18_is_refused(tmp_path):
    with pytest.raises(ExportError, match=r"13\.\.18.*per-channel"):
        export_onnx(calibrated("resnet20_cifar", "onnxruntime"), CALIB[:1], tmp_path / "m.onnx", opset=19)


# ------------------------------------------------------------------------------------ graph structure
def test_every_quantizer_is_one_qdq_pair_with_its_own_parameters(tmpdir_module):
    gm, path, record = exported("resnet20_cifar", "onnxruntime", tmpdir_module)
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    acts = dict(activation_quantizers(gm))
    own = [a for a in record["activations"] if a["copy_of"] is None]
    assert len(own) == len(acts) == 30
    # inputs that reach an integer op through Pad (2 option-A shortcuts) and Flatten (the classifier) get a
    # re-quantizing copy; for uint8 the Slice/Pad/Flatten then run on the codes, so no QDQ pair is left for it
    regrids = [a for a in record["activations"] if a["copy_of"] is not None]
    assert len(regrids) == 3 and all("__regrid_" in a["name"] for a in regrids) and len(q_nodes) == 30
    assert sorted(tuple(a["on_codes"]) for a in regrids) == [("Flatten",), ("Slice", "Slice", "Pad"),
                                                             ("Slice", "Slice", "Pad")]
    assert all(a["quantize"] is None for a in regrids)
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert len(pads) == 2 and all(inits[p.input[2]].dtype == np.uint8 for p in pads)  # fill = zero-point code
    for n in q_nodes:
        q = acts["qb_act." + n.name.split("/")[0].split("__")[0]]
        assert inits[n.input[1]] == float(q.scale)
        assert int(inits[n.input[2]]) == int(q.zero_point) and inits[n.input[2]].dtype == np.uint8
        assert model.graph.node[[m.name for m in model.graph.node].index(n.name) + 1].op_type != "Relu"
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"], "BN must be folded"
    assert not {n.name for n in model.graph.node if n.op_type == "Clip"}, "8-bit ranges need no Clip"


def test_int8_copies_sit_before_kept_relus_and_per_reader(tmpdir_module):
    """Symmetric int8 (TensorRT): ORT keeps a Relu before an int8 QuantizeLinear with zero-point 0, and turns
    int8 pairs into uint8 only when a QuantizeLinear has one reader. The export adds exact copies of the
    quantizer (same scale and zero-point) so every conv and add can still run as an integer kernel."""
    gm, path, record = exported("resnet20_cifar", "tensorrt", tmpdir_module)
    model = onnx.load(str(path))
    acts = {q.name: q for _, q in activation_quantizers(gm)}
    own = [a for a in record["activations"] if a["copy_of"] is None]
    copies = [a for a in record["activations"] if a["copy_of"] is not None]
    assert len(own) == len(acts) == 30
    assert len([c for c in copies if "__before_relu" in c["name"]]) == 19  # stem, 9 block conv1, 9 adds
    for c in copies:
        q = acts[c["copy_of"]]
        assert c["scale"] == [float(q.scale)] and c["zero_point"] == [int(q.zero_point)] == [0]
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert len(readers[n.output[0]]) == 1
            assert len(readers[readers[n.output[0]][0].output[0]]) == 1, f"{n.name}: DequantizeLinear read twice"


def test_weights_are_int8_codes_with_per_channel_axis_and_int32_bias(tmpdir_module):
    gm, path, record = exported("resnet20_cifar", "tensorrt", tmpdir_module)
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dqs = {n.name: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    layers = dict(weight_layers(gm))
    for name, layer in layers.items():
        wdq = dqs[f"{name}/weight/DequantizeLinear"]
        codes = inits[wdq.input[0]]
        w, _ = layer.folded_weight_bias()
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes, requant.weight_codes(layer, w.detach()).numpy().astype(np.int8))
        assert {a.name: a.i for a in wdq.attribute}["axis"] == 0
        np.testing.assert_array_equal(inits[wdq.input[1]], layer.weight_quantizer.scale.numpy())
        bdq = dqs[f"{name}/bias/DequantizeLinear"]
        assert inits[bdq.input[0]].dtype == np.int32 and not inits[bdq.input[2]].any()
        in_q = layer.links.inputs[0]
        np.testing.assert_array_equal(inits[bdq.input[1]], (in_q.scale * layer.weight_quantizer.scale).numpy())
    assert len(record["weights"]) == len(record["biases"]) == len(layers) == 20
    assert all(w["per_channel"] and w["dtype"] == "int8" for w in record["weights"])


def test_constants_are_not_shared_between_nodes(tmpdir_module):
    """ORT's session.x64quantprecision fails on initializers shared between nodes (torch de-duplicates them)."""
    _, path, _ = exported("resnet20_cifar", "onnxruntime", tmpdir_module)
    model = onnx.load(str(path))
    names = {i.name for i in model.graph.initializer}
    uses = [i for n in model.graph.node for i in n.input if i in names]
    assert len(uses) == len(set(uses))


def test_sub_8_bit_exports_narrow_ranges_in_8_bit_containers(tmp_path):
    gm = calibrated("resnet20_cifar", "onnxruntime", w_bits=4, a_bits=4)
    res = export_onnx(gm, CALIB[:1], tmp_path / "w4a4.onnx")
    rec = res.record
    assert rec["narrow_ranges"] and any("container" in n for n in rec["notes"])
    assert all(a["dtype"] == "uint8" and (a["qmin"], a["qmax"]) == (0, 15) and a["narrow"] for a in rec["activations"])
    model = onnx.load(str(res.path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for w in rec["weights"]:
        codes = inits[w["tensor"]]
        assert codes.dtype == np.int8 and codes.min() >= w["qmin"] == -7 and codes.max() <= w["qmax"] == 7
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) == len(rec["activations"])
    r = verify_onnx(res.path, gm, [TEST], x64_quant_precision=True, progress=False)
    assert r.agreement >= 0.995


# ------------------------------------------------------------------------------------ refusals
def test_uncalibrated_model_is_refused(tmp_path):
    gm = prepare(float_model("resnet20_cifar"), load_backend("tensorrt"), CALIB[:1])
    with pytest.raises(ExportError, match="never calibrated"):
        export_onnx(gm, CALIB[:1], tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_academic_backend_is_refused_with_the_reason(tmp_path):
    gm = calibrated("resnet20_cifar", "academic")
    with pytest.raises(ExportError, match="not deployable: it is a research setting"):
        export_onnx(gm, CALIB[:1], tmp_path / "m.onnx")


def test_more_than_8_bits_is_refused(tmp_path):
    gm = calibrated("resnet20_cifar", "onnxruntime", w_bits=12)
    with pytest.raises(ExportError, match="8-bit"):
        export_onnx(gm, CALIB[:1], tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------ agreement (random weights)
@pytest.mark.parametrize("backend", DEPLOYABLE)
@pytest.mark.parametrize("name", ["resnet20_cifar", "mobilenet_v2"])
def test_onnx_runtime_agrees_with_the_simulation(name, backend, tmpdir_module):
    """int8 weights overflow int16 in ORT's AVX2 kernels unless ORT converts them (x64quantprecision, used for
    uint8 activations) or they have 7 bits (reduce_range, used for int8 activations: with x64quantprecision ORT
    converts only single-consumer int8 tensors to uint8, and ops mixing the two types stay in float)."""
    spec = load_backend(backend)
    signed = spec.activation.signedness == "signed"
    gm, path, _ = exported(name, backend, tmpdir_module, reduce_range=signed)
    assert read_metadata(onnx.load(str(path)))["backend"]["name"] == backend
    if spec.arithmetic != "onnxruntime":  # another runtime's arithmetic (torch-x86): checked in that runtime
        r = verify_onnx(path, gm, [TEST], progress=False, runtime=spec.arithmetic)
        assert r.agreement >= 0.995 and {f["op"] for f in r.float_ops} <= {"Gemm", "Clip"}, r  # logits, input
        with torch.no_grad():
            scale = float(gm(TEST).abs().max())
        # oneDNN (symmetric weights on AVX512-VNNI CPUs) and QNNPACK's convolutions round 1 code in about 10^6
        # differently: see requant
        exact = spec.arithmetic == "torch-x86" and not torch_engines.host_has_vnni()
        assert r.max_abs_logit_diff <= (0.0 if exact else 0.05 * scale), r
        return
    r = verify_onnx(path, gm, [TEST], x64_quant_precision=not signed, progress=False)
    assert r.agreement >= 0.995, r
    if all(f["op"] in ("Relu", "Clip") for f in r.float_ops):  # only exact float ops left: bit for bit
        assert r.max_abs_logit_diff < 1e-4
    assert r.int8_kernels == r.kernels_expected, "ORT fused other ops than the simulation assumed"


def test_prepared_model_moves_between_devices():
    """QuantWeighted used to shadow nn.Module._apply, so .to() / .float() failed on a prepared model."""
    gm = calibrated("resnet20_cifar", "onnxruntime")
    gm.to("cpu").float()
    with torch.no_grad():
        assert gm(TEST[:2]).shape == (2, 10)


# ------------------------------------------------------------------------------------ QAT models
@pytest.mark.parametrize("bn_fold", [3, 4])
def test_qat_graph_exports_and_matches_onnx_runtime(bn_fold, tmp_path):
    from quantbench.deploy.lower import bake_for_export
    from quantbench.qat.prepare import prepare_qat

    gm = prepare_qat(calibrated("resnet20_cifar", "onnxruntime"), "lsq", bn_fold)
    with torch.no_grad():
        gm.eval()
        for p in gm.parameters():  # a "trained" step away from the PTQ initialisation
            p.add_(0.01 * torch.randn_like(p))
        qat_out = gm(TEST)
    sim = bake_for_export(gm)
    with torch.no_grad():
        assert (sim(TEST).argmax(1) == qat_out.argmax(1)).float().mean() >= 0.9  # int32 bias, integer requant
    res = export_onnx(sim, CALIB[:1], tmp_path / "qat.onnx", artefacts=[])
    r = verify_onnx(res.path, sim, [TEST], x64_quant_precision=True, progress=False)
    assert r.agreement == 1.0 and r.max_abs_logit_diff < 1e-4


def test_apot_qat_models_are_refused_with_the_reason():
    """APoT's levels are sums of powers of two: no integer runtime executes them. The academic QAT graph is
    refused when its grids are baked (before any ONNX is written) and a hardware backend by prepare_qat itself."""
    from quantbench.deploy.lower import bake_for_export
    from quantbench.errors import ConfigError
    from quantbench.qat.prepare import prepare_qat

    with pytest.raises(ExportError, match="non-uniform levels"):
        bake_for_export(prepare_qat(calibrated("resnet20_cifar", "academic"), "apot", 0))
    with pytest.raises(ConfigError, match="non-uniform"):
        prepare_qat(calibrated("resnet20_cifar", "onnxruntime"), "apot", 3)


def test_qdq_recording_is_per_export_not_module_global():
    """Two exports in flight at once (nested here) each get exactly their own symbolic calls."""
    from quantbench.deploy import qdq
    from quantbench.deploy.export import _run_exporter
    from quantbench.deploy.lower import lower_for_export

    a = lower_for_export(calibrated("resnet20_cifar", "onnxruntime"))
    b = lower_for_export(calibrated("resnet20_cifar", "tensorrt"))
    with qdq.recording(a) as rec_a:
        _, alone_b = _run_exporter(b, CALIB[:1], 13)  # a whole export of another model in between
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(a, (CALIB[:1],), io.BytesIO(), dynamo=False, opset_version=13)
    _, alone_a = _run_exporter(a, CALIB[:1], 13)
    assert rec_a == alone_a and len(alone_b) > 0
    assert not any(isinstance(v, list) for k, v in vars(qdq).items() if k.startswith("_"))  # no global record
