"""QAT quantizers: forward against float64 references of the papers' formulas, gradients against the papers'
STE definitions or finite differences of the straight-through surrogate."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from quantbench.errors import UnknownNameError
from quantbench.qat.quantizers import ALGORITHMS, QuantizerContext
from quantbench.qat.quantizers.apot import apot_levels
from quantbench.qat.quantizers.dsq import dsq_round
from quantbench.quant.quantizer import Quantizer
from quantbench.quant.scheme import QScheme

S4 = QScheme(bits=4, symmetric=True, signedness="signed")
U4 = QScheme(bits=4, symmetric=True, signedness="unsigned")
A4 = QScheme(bits=4, symmetric=False, signedness="signed")
PC4 = QScheme(bits=4, symmetric=True, signedness="signed", granularity="per_channel")


def ctx(scheme: QScheme, weight: bool, hardware: bool = False, channels: int = 1) -> QuantizerContext:
    qmin, qmax = scheme.qrange()
    return QuantizerContext(scheme, qmin, qmax, weight, "q", hardware, channels)


def build(name: str, c: QuantizerContext, **options):  # type: ignore[no-untyped-def]
    alg = ALGORITHMS.get(name)
    return alg.build(c, alg.parse_options(options)).double()


def data(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def fd_grad(f, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Central finite differences of the scalar function ``f`` at every element of ``x`` (vectorized)."""
    eye = torch.eye(x.numel(), dtype=x.dtype).reshape(x.numel(), *x.shape)
    fp = torch.func.vmap(f)(x.unsqueeze(0) + eps * eye)
    fm = torch.func.vmap(f)(x.unsqueeze(0) - eps * eye)
    return ((fp - fm) / (2 * eps)).reshape(x.shape)


def np_quant(v: np.ndarray, s, z, qmin: int, qmax: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return (np.clip(np.round(v / s + z), qmin, qmax) - z) * s


# ------------------------------------------------------------------------------------------------ LSQ
def test_lsq_forward_and_gradients_follow_the_paper() -> None:
    q = build("lsq", ctx(U4, False))
    x = data(4, 3, 5, 5).abs() * 2
    q.init_from_qparams(torch.tensor([0.1]), torch.tensor([0]))
    x.requires_grad_(True)
    y = q(x)
    s, n = q.scale.item(), x[0].numel()
    xn = x.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), np_quant(xn, s, 0, 0, 15), rtol=0, atol=1e-12)
    y.sum().backward()
    v = xn / s
    inside = (v >= 0) & (v <= 15)
    np.testing.assert_array_equal(x.grad.numpy(), inside.astype(float))
    ds = np.where(inside, np.round(v) - v, np.where(v < 0, 0, 15)).sum() / math.sqrt(n * 15)
    np.testing.assert_allclose(q.scale.grad.numpy(), [ds], rtol=1e-10)


def test_lsq_per_channel_weights_gradient_scale_uses_weights_per_channel() -> None:
    w = data(3, 2, 3, 3)
    q = build("lsq", ctx(PC4, True, channels=3))
    y = q(w)  # paper init from the tensor: s = 2 mean|w| / sqrt(N_max) per channel
    s_ref = 2 * w.abs().reshape(3, -1).mean(1) / math.sqrt(7)
    torch.testing.assert_close(q.scale.detach(), s_ref, rtol=1e-6, atol=0)
    y.sum().backward()
    v = (w / q.scale.detach().reshape(3, 1, 1, 1)).numpy()
    inside = (v >= -8) & (v <= 7)
    ds = np.where(inside, np.round(v) - v, np.where(v < -8, -8, 7)).reshape(3, -1).sum(1) / math.sqrt(18 * 7)
    np.testing.assert_allclose(q.scale.grad.numpy(), ds, rtol=1e-6)


def test_lsq_plus_learns_an_integer_zero_point_with_ste() -> None:
    q = build("lsq+", ctx(A4, False))
    q.init_from_qparams(torch.tensor([0.2]), torch.tensor([-3]))
    with torch.no_grad():
        q.zero_point.fill_(-2.7)  # rounds to -3 in the forward pass
    x = data(2, 4, 6, 6).requires_grad_(True)
    y = q(x)
    xn, s = x.detach().numpy(), q.scale.item()
    np.testing.assert_allclose(y.detach().numpy(), np_quant(xn, s, -3, -8, 7), atol=1e-12)
    y.sum().backward()
    v = xn / s - 3
    inside = (v >= -8) & (v <= 7)
    g = 1 / math.sqrt(x[0].numel() * 7)
    np.testing.assert_allclose(q.zero_point.grad.numpy(), [(~inside).sum() * -s * g], rtol=1e-9)
    ds = np.where(inside, np.round(v) + 3 - xn / s, np.where(v < -8, -8 + 3, 7 + 3)).sum() * g
    np.testing.assert_allclose(q.scale.grad.numpy(), [ds], rtol=1e-9)


def test_lsq_initialised_from_a_calibrated_quantizer_reproduces_it() -> None:
    x = data(8, 4, 5, 5, seed=1).float()
    ptq = Quantizer(U4, "minmax", False, "a")
    ptq.observing = True
    ptq(x.relu())
    ptq.compute_qparams()
    ptq.observing, ptq.quantizing = False, True
    q = ALGORITHMS.get("lsq").build(QuantizerContext.from_quantizer(ptq, True), ALGORITHMS.get("lsq").parse_options({}))
    q.init_from_quantizer(ptq)
    torch.testing.assert_close(q(x.relu()), ptq(x.relu()), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------- PACT
@pytest.mark.parametrize(("scheme", "lo_kind"), [(U4, "zero"), (S4, "minus_alpha"), (A4, "beta")])
def test_pact_clips_quantizes_and_learns_alpha_only_outside(scheme: QScheme, lo_kind: str) -> None:
    q = build("pact", ctx(scheme, False, hardware=True), alpha_init=1.5, beta_init=-1.0)
    x = (data(3, 4, 8, 8) * 2).requires_grad_(True)
    y = q(x)
    a = 1.5
    lo = {"zero": 0.0, "minus_alpha": -a, "beta": -1.0}[lo_kind]
    qmin, qmax = scheme.qrange()
    xn = x.detach().numpy()
    c = np.clip(xn, lo, a)
    if scheme.symmetric:
        s, z = (a / qmax, 0) if qmin == 0 else (a / ((qmax - qmin) / 2), 0)
    else:
        s = (a - lo) / (qmax - qmin)
        z = qmin - np.round(lo / s)
    np.testing.assert_allclose(y.detach().numpy(), np_quant(c, s, z, qmin, qmax), atol=1e-12)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), ((xn >= lo) & (xn <= a)).astype(float))
    d_alpha = (xn > a).sum() - ((xn < -a).sum() if lo_kind == "minus_alpha" else 0)
    np.testing.assert_allclose(q.alpha.grad.numpy(), [d_alpha])
    if lo_kind == "beta":
        np.testing.assert_allclose(q.beta.grad.numpy(), [(xn < lo).sum()])


def test_pact_default_init_is_six() -> None:
    q = build("pact", ctx(A4, False, hardware=True))
    assert q.alpha.item() == 6.0 and q.beta.item() == -6.0


# ------------------------------------------------------------------------------------------------ DSQ
def test_dsq_weights_use_mean_pm_2_6_sigma_and_the_soft_gradient() -> None:
    w = data(4, 3, 3, 3).requires_grad_(True)
    q = build("dsq", ctx(S4, True))
    y = q(w)
    wn = w.detach().numpy()
    mu, sd = wn.mean(), wn.std()
    lo, hi = mu - 2.6 * sd, mu + 2.6 * sd
    s = max(-lo, hi) / 7.5
    np.testing.assert_allclose(y.detach().numpy(), np_quant(wn, s, 0, -8, 7), atol=1e-12)
    y.sum().backward()
    v = wn / s
    k = 2 * math.atanh(0.6)
    f = v - np.floor(v)
    soft = 0.5 * k / 0.6 * (1 - np.tanh(k * (f - 0.5)) ** 2)
    np.testing.assert_allclose(w.grad.numpy(), np.where((v > -8) & (v < 7), soft, 0), rtol=1e-9)


def test_dsq_soft_step_is_continuous_and_steps_at_integers() -> None:
    v = torch.linspace(-3, 3, 601, dtype=torch.float64)
    torch.testing.assert_close(dsq_round(v, 0.4), torch.round(v))
    k = 2 * math.atanh(0.6)
    fl = torch.floor(v)
    soft = fl + 0.5 * torch.tanh(k * (v - fl - 0.5)) / 0.6 + 0.5
    integer = v == v.floor()
    torch.testing.assert_close(soft[integer], v[integer])  # soft(n) = n: no jump at the integers
    assert torch.all(torch.diff(soft) > 0)


def test_dsq_activation_range_is_a_batch_min_max_ema() -> None:
    q = build("dsq", ctx(A4, False))
    q.init_from_qparams(torch.tensor([0.5]), torch.tensor([0]))  # range [-4, 3.5]
    x = data(5, 3, 4, 4)
    q.train()
    q(x)
    rows = x.reshape(5, -1)
    lo = 0.9 * -4.0 + 0.1 * rows.min(1).values.mean().item()
    hi = 0.9 * 3.5 + 0.1 * rows.max(1).values.mean().item()
    np.testing.assert_allclose([q.lo.item(), q.hi.item()], [lo, hi], rtol=1e-6)
    before = q.lo.clone()
    q.eval()
    q(x)
    torch.testing.assert_close(q.lo, before)


# --------------------------------------------------------------------------------------------- DoReFa
def test_dorefa_weights_follow_eq_14_15_and_gradients_match_finite_differences() -> None:
    w = (data(3, 2, 2, 2) * 0.7).requires_grad_(True)
    q = build("dorefa", ctx(S4, True), rescale=False)
    y = q(w)
    wn = w.detach().numpy()
    t = np.tanh(wn) / np.abs(np.tanh(wn)).max()
    np.testing.assert_allclose(y.detach().numpy(), np_quant(t, 2 / 15, 0, -8, 7), atol=1e-12)
    c = data(3, 2, 2, 2, seed=5)
    (y * c).sum().backward()

    def surrogate(v: torch.Tensor) -> torch.Tensor:  # the STE surrogate: round -> identity
        tt = torch.tanh(v) / torch.tanh(v).abs().amax()
        return (tt * c).sum()

    torch.testing.assert_close(w.grad, fd_grad(surrogate, w.detach()), rtol=1e-5, atol=1e-7)
    r = build("dorefa", ctx(S4, True))
    torch.testing.assert_close(r(w.detach()), y.detach() * w.detach().abs().max())


@pytest.mark.parametrize(("hardware", "scheme", "lo"), [(False, U4, 0.0), (True, S4, -1.0), (True, A4, -1.0)])
def test_dorefa_activations_clip_to_0_1_academic_or_pm1_hardware(hardware: bool, scheme: QScheme, lo: float) -> None:
    q = build("dorefa", ctx(scheme, False, hardware=hardware))
    x = (data(2, 3, 5, 5) * 1.5).requires_grad_(True)
    y = q(x)
    qmin, qmax = scheme.qrange()
    if scheme.symmetric:
        s, z = (1 / qmax, 0) if qmin == 0 else (2 / (qmax - qmin), 0)
    else:
        s = 2 / (qmax - qmin)
        z = qmin - np.round(-1 / s)
    xn = x.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), np_quant(np.clip(xn, lo, 1), s, z, qmin, qmax), atol=1e-12)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), ((xn >= lo) & (xn <= 1)).astype(float))


# ------------------------------------------------------------------------------------------------ QIL
@pytest.mark.parametrize("gamma", [1.0, 0.7])
def test_qil_transformer_eq_16_17_and_learned_interval_gradients(gamma: float) -> None:
    w = data(4, 3, 2, 2)
    q = build("qil", ctx(S4, True), gamma=gamma, rescale=False)
    with torch.no_grad():
        q.center.fill_(0.6)
        q.distance.fill_(0.4)
    q.mark_initialized()
    w.requires_grad_(True)
    y = q(w)
    wn = w.detach().numpy()
    a, b = 1 / (2 * 0.4), -0.6 / (2 * 0.4) + 0.5
    t = np.clip(a * np.abs(wn) + b, 0, 1) ** gamma * np.sign(wn)
    np.testing.assert_allclose(y.detach().numpy(), np_quant(t, 1 / 7, 0, -8, 7), atol=1e-12)
    y.sum().backward()
    g = 1 / math.sqrt(w.numel() * 7)

    def surrogate(p: torch.Tensor) -> torch.Tensor:
        c, d = p[0], p[1]
        tt = torch.clamp(w.detach().abs() / (2 * d) - c / (2 * d) + 0.5, 0, 1) ** gamma * torch.sign(w.detach())
        return tt.sum()

    fd = fd_grad(surrogate, torch.tensor([0.6, 0.4], dtype=torch.float64))
    torch.testing.assert_close(torch.cat([q.center.grad, q.distance.grad]), fd * g, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------- APoT
def test_apot_levels_are_sums_of_powers_of_two() -> None:
    for b in range(2, 7):
        lv = apot_levels(b)
        assert lv.numel() == 2**b and lv[0] == 0 and lv[-1] == 1
        assert torch.all(torch.diff(lv) > 0)
    torch.testing.assert_close(apot_levels(2), torch.tensor([0, 0.25, 0.5, 1.0], dtype=torch.float64))
    raw = sorted({a + b for a in (0, 2**-1, 2**-3, 2**-5) for b in (0, 2**-2, 2**-4, 2**-6)})
    torch.testing.assert_close(apot_levels(4), torch.tensor(raw, dtype=torch.float64) / max(raw))


def test_apot_weights_normalise_project_and_follow_the_authors_backward() -> None:
    w = data(4, 3, 3, 3).requires_grad_(True)
    q = build("apot", ctx(S4, True), rescale=False)
    y = q(w)
    wn = w.detach().numpy()
    n = (wn - wn.mean()) / wn.std(ddof=1)
    levels = apot_levels(3).numpy()
    c = np.clip(n / 3.0, -1, 1)
    nearest = levels[np.abs(np.abs(c)[..., None] - levels).argmin(-1)] * np.sign(c)
    np.testing.assert_allclose(y.detach().numpy(), 3.0 * nearest, atol=1e-12)
    y.sum().backward()
    np.testing.assert_allclose(w.grad.numpy(), np.ones_like(wn) / wn.std(ddof=1), rtol=1e-9)
    xn = n / 3.0
    d_alpha = np.where(np.abs(xn) > 1, np.sign(xn), nearest - xn).sum()
    np.testing.assert_allclose(q.alpha.grad.numpy(), [d_alpha], rtol=1e-9)


# ---------------------------------------------------------------------------------------------- fixed
def test_fixed_is_the_calibrated_fake_quantizer_with_nothing_to_learn() -> None:
    q = build("fixed", ctx(PC4, True, channels=2))
    q.init_from_qparams(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]))
    assert not list(q.parameters())
    w = data(2, 3, 3, 3)
    ref = np_quant(w.numpy(), np.array([0.1, 0.2]).reshape(2, 1, 1, 1), 0, -8, 7)
    np.testing.assert_allclose(q(w).detach().numpy(), ref, atol=1e-12)


# ---------------------------------------------------------------------------------------- everything
@pytest.mark.parametrize("name", ["lsq", "lsq+", "pact", "dsq", "dorefa", "apot", "qil", "fixed"])
def test_every_algorithm_runs_under_bfloat16_and_keeps_the_dtype(name: str) -> None:
    for weight in (True, False):
        alg = ALGORITHMS.get(name)
        q = alg.build(ctx(S4, weight, hardware=True), alg.parse_options({}))
        x = torch.randn(2, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
        y = q(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
        y.float().sum().backward()
        assert torch.isfinite(x.grad.float()).all()
        q.describe()


def test_unknown_algorithm_and_option_are_named() -> None:
    with pytest.raises(UnknownNameError, match="lsq"):
        ALGORITHMS.get("lsqq")
    with pytest.raises(ValueError, match="alpha_inti"):
        ALGORITHMS.get("pact").parse_options({"alpha_inti": 3})


def test_lsq_kernel_equals_the_op_by_op_ste_form_per_channel_asymmetric() -> None:
    from quantbench.qat.quantizers.lsq_kernel import lsq_fake_quant
    from quantbench.quant.ste import fake_quant_ste, grad_scale, round_ste

    x = data(3, 4, 5, 5).requires_grad_(True)
    s = torch.tensor([0.1, 0.2, 0.15], dtype=torch.float64, requires_grad=True)
    z = torch.tensor([-2.4, 0.6, 3.0], dtype=torch.float64, requires_grad=True)
    c = data(3, 4, 5, 5, seed=9)
    (lsq_fake_quant(x, s, round_ste(z), -8, 7, 0.3, 0, True) * c).sum().backward()
    grads = [t.grad.clone() for t in (x, s, z)]
    for t in (x, s, z):
        t.grad = None
    shape = (3, 1, 1, 1)
    ref = fake_quant_ste(x, grad_scale(s, 0.3).reshape(shape), round_ste(grad_scale(z, 0.3)).reshape(shape), -8, 7)
    (ref * c).sum().backward()
    for mine, theirs in zip(grads, (x.grad, s.grad, z.grad), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["lsq", "lsq+", "fixed", "pact", "dsq", "qil"])
def test_every_uniform_algorithm_starts_from_the_calibrated_range(name: str) -> None:
    x = (data(16, 4, 6, 6, seed=2).float() * 2).relu()
    ptq = Quantizer(QScheme(bits=4, symmetric=False, signedness="unsigned"), "minmax", False, "a")
    ptq.observing = True
    ptq(x)
    ptq.compute_qparams()
    alg = ALGORITHMS.get(name)
    q = alg.build(QuantizerContext.from_quantizer(ptq, True), alg.parse_options({}))
    q.init_from_quantizer(ptq)
    q.eval()
    lo, hi = q.clip_range()
    s, zp = ptq.scale.item(), ptq.zero_point.item()
    assert hi.item() == pytest.approx((15 - zp) * s, rel=1e-5)
    assert lo.item() == pytest.approx((0 - zp) * s, abs=1e-6)


def test_lsq_power_of_two_scales_for_tvm() -> None:
    q = build("lsq", ctx(QScheme(bits=8, scale_type="pow2"), False))
    q.init_from_qparams(torch.tensor([0.03]), torch.tensor([0]))
    y = q(data(2, 3, 4, 4))
    s, _ = q.export_qparams()
    assert s.item() == 2.0**-5
    assert torch.allclose(y / s, torch.round(y / s))


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile needs a C++ compiler on CPU")
@pytest.mark.parametrize("zero", [0.0, -3.0])
def test_fused_lsq_kernel_equals_the_reference_path(zero: float) -> None:
    from quantbench.qat.quantizers.lsq_kernel import lsq_fake_quant

    x = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    g = torch.randn(4, 8, 16, 16, generator=torch.Generator().manual_seed(4))
    out = []
    for fused in (False, True):
        xi = x.clone().requires_grad_(True)
        s = torch.tensor([0.2], requires_grad=True)
        z = torch.tensor([zero], requires_grad=True)
        y = lsq_fake_quant(xi, s, z, -8, 7, 0.05, None, zero != 0.0, zero == 0.0, fused=fused)
        y.backward(g)
        out.append((y.detach(), xi.grad, s.grad, z.grad))
    for ref, fused_t in zip(out[0], out[1], strict=True):
        if ref is not None:
            torch.testing.assert_close(fused_t, ref, rtol=1e-5, atol=1e-5)
