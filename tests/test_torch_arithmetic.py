"""``arithmetic: torch-x86`` / ``torch-qnnpack``: each formula of :mod:`quantbench.graph.torch_engines` and
:mod:`quantbench.graph.requant` against PyTorch's own int8 kernels (``torch.ops.quantized``) bit for bit, and the
``torch-x86`` / ``torch-qnnpack`` runtimes against the simulation on exported models (random weights: no shared
data needed)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantbench.backends import load_backend
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.runtimes import get_runtime
from quantbench.deploy.runtimes.torch_qdq import engine
from quantbench.graph import requant, torch_engines
from quantbench.graph.quantize import prepare
from quantbench.graph.requant import IntAdd, IntGlobalAvgPool
from quantbench.graph.torch_engines import qnnpack_add, qnnpack_global_avg_pool, torch_add, torch_global_avg_pool
from quantbench.ptq import calibrate
from quantbench.quant.quantizer import Quantizer
from quantbench.quant.scheme import QScheme

pytestmark = pytest.mark.usefixtures("torch_one_thread")
U8 = QScheme(bits=8, symmetric=False, signedness="unsigned")
S8 = QScheme(bits=8, symmetric=True, signedness="signed")
F32, F64 = torch.float32, torch.float64


def quantizer(scheme: QScheme, lo: float, hi: float) -> Quantizer:
    """A calibrated activation quantizer whose range is [lo, hi]."""
    q = Quantizer(scheme, "minmax", False, "a")
    q.observing = True
    q(torch.tensor([lo, hi]))
    q.observing = False
    q.compute_qparams()
    q.quantizing = True
    return q


def fixed(scheme: QScheme, scale: torch.Tensor, zero_point: torch.Tensor, is_weight: bool = False) -> Quantizer:
    """A quantizer with the given parameters (its scheme's integer range)."""
    q = Quantizer(scheme, "minmax", is_weight, "w" if is_weight else "a")
    q.set_qparams(scale, zero_point, *scheme.qrange(scheme.signedness == "signed"))
    q.quantizing = True
    return q


def qtensor(codes: torch.Tensor, q: Quantizer) -> torch.Tensor:
    """PyTorch's quint8 tensor of ``codes`` on ``q``'s grid (int8 shifted by 128, as its kernels need)."""
    shift = 128 if q.qmin < 0 else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._make_per_tensor_quantized_tensor((codes.to(torch.int16) + shift).to(torch.uint8),
                                                       float(q.scale), int(q.zero_point) + shift)


def random_codes(q: Quantizer, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(q.qmin, q.qmax + 1, shape, generator=gen, dtype=torch.int16)


@pytest.mark.parametrize(("engine_name", "formula"), [("x86", torch_add), ("qnnpack", qnnpack_add)])
@pytest.mark.parametrize("schemes", [(U8, U8, U8), (S8, S8, S8), (U8, S8, U8)])
def test_the_add_formula_is_the_engines_quantized_add_bit_for_bit(schemes, engine_name, formula):
    """x86: float32 with FMA dequantization; QNNPACK: fixed-point multipliers and a rounding shift."""
    if engine_name not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {engine_name} engine in this PyTorch build")
    gen = torch.Generator().manual_seed(0)
    mismatches = 0
    for _ in range(60):
        qa, qb, qy = (quantizer(s, -float(torch.rand((), generator=gen)) * 3 - 0.1,
                                float(torch.rand((), generator=gen)) * 5 + 0.1) for s in schemes)
        if qa.qmin != qb.qmin:
            continue  # the kernel adds tensors of one dtype
        ca, cb = random_codes(qa, (4096,), gen), random_codes(qb, (4096,), gen)
        with engine(engine_name):
            y = torch.ops.quantized.add(qtensor(ca, qa), qtensor(cb, qb), float(qy.scale),
                                        int(qy.zero_point) + (128 if qy.qmin < 0 else 0))
        ref = y.int_repr().to(torch.int32) - (128 if qy.qmin < 0 else 0)
        ours = formula(ca.to(F32), cb.to(F32), qa, qb, qy).clamp(qy.qmin, qy.qmax).to(torch.int32)
        mismatches += int((ours != ref).sum())
    assert mismatches == 0


@pytest.mark.parametrize(("engine_name", "formula"), [("x86", torch_global_avg_pool),
                                                      ("qnnpack", qnnpack_global_avg_pool)])
def test_the_global_pool_formula_is_the_engines_pool_then_requantization(engine_name, formula):
    if engine_name not in torch.backends.quantized.supported_engines:
        pytest.skip(f"no {engine_name} engine in this PyTorch build")
    gen = torch.Generator().manual_seed(1)
    for trial in range(40):
        qx = quantizer(U8, 0.0, float(torch.rand((), generator=gen)) * 6 + 0.5)
        qy = quantizer(U8, 0.0, float(torch.rand((), generator=gen)) * 3 + 0.2)
        side = int(torch.randint(1, 9, (), generator=gen))
        cx = random_codes(qx, (3, 16, side, side), gen)
        with engine(engine_name):
            pooled = F.adaptive_avg_pool2d(qtensor(cx, qx), 1)
            assert (pooled.q_scale(), pooled.q_zero_point()) == (float(qx.scale), int(qx.zero_point))
            ref = torch.quantize_per_tensor(pooled.dequantize(), float(qy.scale), int(qy.zero_point), torch.quint8)
        ours = formula(cx.to(F32), qx, qy).clamp(0, 255).to(torch.int32)
        assert torch.equal(ours, ref.int_repr().to(torch.int32)), trial
        with engine(engine_name):  # the same grid: the kernel's rounding alone, no requantization
            alone = F.adaptive_avg_pool2d(qtensor(cx, qx), 1).int_repr().to(torch.int32)
        assert torch.equal(formula(cx.to(F32), qx, qx).to(torch.int32), alone), trial


def _conv_case(gen: torch.Generator, symmetric: bool):
    cin = cout = 16
    x = torch.randint(0, 256, (8, cin, 12, 12), generator=gen, dtype=torch.uint8)
    zx, sx = int(torch.randint(0, 60, (), generator=gen)), float(torch.rand((), generator=gen) * 0.05 + 1e-3)
    w = torch.randint(-128, 128, (cout, cin, 3, 3), generator=gen, dtype=torch.int8)
    sw = (torch.rand(cout, generator=gen, dtype=F64) * 0.01 + 1e-4).to(F32)
    zw = torch.zeros(cout, dtype=torch.long) if symmetric else torch.randint(-5, 5, (cout,), generator=gen)
    sy, zy = float(torch.rand((), generator=gen) * 0.5 + 0.05), int(torch.randint(0, 256, (), generator=gen))
    bq = torch.randint(-20000, 20000, (cout,), generator=gen).to(F32)
    return x, zx, sx, w, sw, zw, sy, zy, bq


def _kernel(x, zx, sx, w, sw, zw, sy, zy, bias) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = torch._make_per_tensor_quantized_tensor(x, sx, zx)
        qw = torch._make_per_channel_quantized_tensor(w, sw.double(), zw, 0)
    packed = torch.ops.quantized.conv2d_prepack(qw, bias, [1, 1], [1, 1], [1, 1], 1)
    return torch.ops.quantized.conv2d(qx, packed, sy, zy).int_repr().to(torch.int32)


class _Layer(nn.Module):
    """What :func:`requant.integer_weighted` reads of a layer: its conv, weight quantizer and kind."""

    def __init__(self, conv: nn.Conv2d, wq: Quantizer) -> None:
        super().__init__()
        self.module, self.weight_quantizer, self.is_linear = conv, wq, False

    def compute(self, x, w, b):
        return self.module._conv_forward(x, w, b)


def _simulated(x, zx, sx, w, sw, zw, sy, zy, bq, monkeypatch, vnni: bool) -> torch.Tensor:
    """``integer_weighted`` with ``arithmetic: torch-x86`` on the same codes: the output codes."""
    monkeypatch.setattr(torch_engines, "host_has_vnni", lambda: vnni)
    monkeypatch.setattr(torch_engines.sys, "platform", "linux")
    wscheme = QScheme(bits=8, symmetric=bool((zw == 0).all()), signedness="signed", granularity="per_channel")
    wq = fixed(wscheme, sw, zw, is_weight=True)
    in_q, out_q = fixed(U8, torch.tensor([sx]), torch.tensor([zx])), fixed(U8, torch.tensor([sy]), torch.tensor([zy]))
    layer = _Layer(nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1, bias=True), wq)
    links = requant.Links([in_q], [False], out_q, [], "torch-x86")
    xf = (x.to(F32) - zx) * torch.tensor(sx, dtype=F32)
    wf = (w.to(F32) - zw.reshape(-1, 1, 1, 1).to(F32)) * sw.reshape(-1, 1, 1, 1)
    b = bq * (torch.tensor(sx, dtype=F32) * sw)  # the float bias: the int32 codes come back exactly
    y = requant.integer_weighted(layer, xf, wf, b, links)
    return (torch.round(y / torch.tensor(sy, dtype=F32)) + zy).to(torch.int32)


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_fbgemm_conv_formula_is_the_fbgemm_kernel_bit_for_bit(symmetric, monkeypatch):
    """FBGEMM (the x86 engine's kernels for asymmetric weights, and everywhere without AVX512-VNNI):
    ``rne((float32(acc) + float32(b / s_xw)) * M) + z_y``; ORT's ``float32(acc + b_q) * M`` differs here."""
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):
        case = _conv_case(gen, symmetric)
        x, zx, sx, w, sw, zw, sy, zy, bq = case
        with engine("fbgemm"):
            ref = _kernel(x, zx, sx, w, sw, zw, sy, zy, bq * (torch.tensor(sx, dtype=F32) * sw))
        assert torch.equal(_simulated(*case, monkeypatch, vnni=False), ref)


def test_the_onednn_conv_formula_is_within_one_code_of_the_kernel_on_vnni_hosts(monkeypatch):
    """oneDNN (the x86 engine's kernel for symmetric weights on AVX512-VNNI CPUs): the fitted float32 formula
    equals the kernel except about one output in 10^6, by one code (its exact rounding is not reproduced)."""
    if not torch_engines.host_has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI: PyTorch's x86 engine never runs oneDNN convolutions here")
    gen = torch.Generator().manual_seed(3)
    differ = total = 0
    for _ in range(6):
        case = _conv_case(gen, True)
        x, zx, sx, w, sw, zw, sy, zy, bq = case
        with engine("x86"):
            ref = _kernel(x, zx, sx, w, sw, zw, sy, zy, bq * (torch.tensor(sx, dtype=F32) * sw))
        ours = _simulated(*case, monkeypatch, vnni=True)
        assert (ours - ref).abs().max() <= 1
        differ, total = differ + int((ours != ref).sum()), total + ref.numel()
    assert differ / total < 1e-5, (differ, total)


def test_the_x86_engine_picks_onednn_only_for_symmetric_convolutions_on_vnni_linux(monkeypatch):
    wq = fixed(QScheme(bits=8, symmetric=True, granularity="per_channel"), torch.ones(4), torch.zeros(4), True)
    conv, lin = _Layer(nn.Conv2d(9, 4, 1), wq), _Layer(nn.Conv2d(9, 4, 1), wq)
    lin.is_linear = True
    monkeypatch.setattr(torch_engines.sys, "platform", "linux")
    monkeypatch.setattr(torch_engines, "host_has_vnni", lambda: True)
    assert torch_engines.x86_conv_kernel(conv) == "onednn" and torch_engines.x86_conv_kernel(lin) == "fbgemm"
    wq.zero_point.data.fill_(1)
    assert torch_engines.x86_conv_kernel(conv) == "fbgemm"  # asymmetric weights: FBGEMM
    wq.zero_point.data.fill_(0)
    monkeypatch.setattr(torch_engines, "host_has_vnni", lambda: False)
    assert torch_engines.x86_conv_kernel(conv) == "fbgemm"


class _Block(nn.Module):
    """conv-bn-relu, a residual add with relu, a global pool and a linear head: every torch-x86 kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        y = torch.relu(self.conv3(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def _exported(tmp_path, spec, seed: int = 0):
    torch.manual_seed(seed)
    model = _Block().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
    calib, test = torch.randn(32, 3, 16, 16), torch.randn(64, 3, 16, 16)
    gm = prepare(model, spec, calib[:1], "minmax", "minmax")
    calibrate(gm, [(calib, None)], progress=False)
    path = export_onnx(gm, calib[:1], tmp_path / f"{spec.name}.onnx", artefacts=[]).path
    return gm, path, [(test, torch.zeros(64, dtype=torch.long))]


def test_torch_x86_runs_the_simulation_bit_for_bit_when_fbgemm_computes(tmp_path):
    """With asymmetric weights the x86 engine runs FBGEMM on every CPU: the runtime's logits equal the
    simulation's (every conv, add and pool in int8; the float-output linear in float, as exported)."""
    spec = load_backend("x86").model_copy(update={"name": "x86-asymmetric", "weight": QScheme(
        bits=8, symmetric=False, signedness="signed", granularity="per_channel")})
    gm, path, data = _exported(tmp_path, spec)
    r = verify_onnx(path, gm, data, progress=False, runtime="torch-x86")
    assert r.max_abs_logit_diff == 0.0 and r.agreement == 1.0, r
    assert r.int8_kernels == {"Add": 1, "Conv": 3, "GlobalAveragePool": 1}
    assert [f["op"] for f in r.float_ops] == ["Clip", "Gemm"], r.float_ops  # the 7-bit input clamp; the logits
    assert "not quantized" in r.float_ops[1]["reason"]


def test_the_x86_spec_matches_torch_x86_and_onnxruntime_differs_in_add_and_pool(tmp_path):
    gm, path, data = _exported(tmp_path, load_backend("x86"), seed=1)
    r = verify_onnx(path, gm, data, progress=False, runtime="torch-x86")
    bound = 0.0 if not torch_engines.host_has_vnni() else 0.05  # oneDNN: one code, about 1 output in 10^6
    assert r.agreement == 1.0 and r.max_abs_logit_diff <= bound, r
    ort = verify_onnx(path, gm, data, x64_quant_precision=True, progress=False, runtime="onnxruntime")
    assert ort.max_abs_logit_diff > 0.0  # ORT's QLinearAdd / pool round differently: not this spec's runtime


def test_torch_qnnpack_runs_the_qnnpack_spec_within_a_code(tmp_path):
    """QNNPACK's add and pool are modelled exactly, its convolutions up to a code in about 10^6 outputs (on the
    shared ResNet-20 bit-exact: docs/BENCHMARKS.md)."""
    if get_runtime("torch-qnnpack").missing():
        pytest.skip(get_runtime("torch-qnnpack").missing() or "")
    gm, path, data = _exported(tmp_path, load_backend("qnnpack"), seed=2)
    r = verify_onnx(path, gm, data, progress=False, runtime="torch-qnnpack")
    assert r.int8_kernels == {"Add": 1, "Conv": 3, "GlobalAveragePool": 1} and r.agreement == 1.0, r
    with torch.no_grad():
        assert r.max_abs_logit_diff <= 0.02 * float(gm(data[0][0]).abs().max()), r


def test_int_add_and_pool_modules_use_the_links_arithmetic():
    q = quantizer(U8, 0.0, 2.0)
    with pytest.raises(ValueError, match="unknown integer arithmetic 'tensorrt'"):
        requant.Links([q, q], [False, False], q, [], "tensorrt")
    links = requant.Links([q, q], [False, False], q, [], "torch-x86")
    a = torch.full((1, 1, 2, 2), float(q.scale) * 3)
    with torch.no_grad():
        assert torch.equal(IntAdd(links)(a, a), a * 2) and IntGlobalAvgPool(links)(a).shape == (1, 1, 1, 1)
