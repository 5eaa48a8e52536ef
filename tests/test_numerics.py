"""Numerics of the quantization primitives against independent references.

References used here:

* the formulas of seed 001 (section E integer ranges, eq. 6-7 scale / zero-point) and seed 003
  (eq. 3 ternary, eq. 4 binary), re-implemented below in float64 numpy;
* torch's own ``torch.ao.quantization`` observers and native ``torch.fake_quantize_per_*_affine``
  kernels, where quantbench's conventions overlap with torch's.

No hypothesis (not installed): every randomised test uses a fixed-seed numpy RNG over a small grid.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from quantbench.qat.quantizers.ternary import binary_quantize, ternary_quantize
from quantbench.quant.fake_quant import dequantize, fake_quantize, quantize
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.scheme import QScheme

EPS32 = float(np.finfo(np.float32).eps)
# x/s is computed as x * float32(1/s) (like torch's kernel), not as a correctly rounded x/s; the two
# can only round to different integers when the exact x/s lies this close (relatively) to a .5 tie.
TIE_RTOL = 1e-6


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def t32(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


# ------------------------------------------------------------------------------------------------
# float64 numpy references
# ------------------------------------------------------------------------------------------------
def ref_qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Seed 001 section E."""
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1


def ref_qparams(lo, hi, qmin: int, qmax: int, symmetric: bool, pow2: bool = False):
    """Scale / zero-point in float64 (seed 001 eq. 6 symmetric, eq. 7 asymmetric)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)

    def finish(s):
        s = np.maximum(s, EPS32)
        return np.exp2(np.ceil(np.log2(s))) if pow2 else s

    if symmetric:
        if qmin < 0:
            s = finish(np.maximum(np.maximum(-lo, hi), 0.0) / ((qmax - qmin) / 2.0))
        else:
            s = finish(np.maximum(hi, 0.0) / qmax)
        return s, np.zeros(s.shape, dtype=np.int64), None
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    s = finish((hi - lo) / (qmax - qmin))
    ratio = lo / s
    return s, np.clip(qmin - np.rint(ratio), qmin, qmax).astype(np.int64), ratio


def ref_fake_quant(x, s, z, qmin: int, qmax: int, axis: int | None = None):
    """(output, in-range mask, x/s) in float64: round half to even, add z, clamp, dequantize."""
    x = np.asarray(x, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    v = x / s
    q = np.rint(v) + z
    mask = (q >= qmin) & (q <= qmax)
    return (np.clip(q, qmin, qmax) - z) * s, mask, v


def near_tie(v: np.ndarray) -> np.ndarray:
    """Where the exact x/s is within TIE_RTOL (relative) of a k + 0.5 tie."""
    return np.abs(np.abs(v - np.floor(v)) - 0.5) <= TIE_RTOL * np.maximum(np.abs(v), 1.0)


def ref_binary_weights(w: np.ndarray, ternary: bool, threshold: float = 0.7) -> np.ndarray:
    """Seed 003 eq. 2-4 per output filter (axis 0) in float64."""
    w = np.asarray(w, dtype=np.float64)
    m = np.abs(w.reshape(w.shape[0], -1)).mean(axis=1).reshape(-1, *([1] * (w.ndim - 1)))
    if ternary:
        return np.sign(w) * (np.abs(w) >= threshold * m) * m
    return np.where(w >= 0, 1.0, -1.0) * m


# ------------------------------------------------------------------------------------------------
# 1. QScheme
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 17))
def test_qscheme_qrange_matches_seed001_formula_for_all_bit_widths(bits):
    for signed in (True, False):
        assert QScheme(bits=bits).qrange(signed) == ref_qrange(bits, signed)
    assert QScheme(bits=bits, signedness="signed").qrange() == ref_qrange(bits, True)
    assert QScheme(bits=bits, signedness="unsigned").qrange() == ref_qrange(bits, False)
    if bits >= 2:
        narrow = QScheme(bits=bits, narrow_range=True)
        assert narrow.qrange(True) == ref_qrange(bits, True, narrow=True)
        assert narrow.qrange(True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
        assert narrow.qrange(False) == ref_qrange(bits, False)  # narrow leaves unsigned alone


def test_qscheme_known_ranges():
    assert QScheme(bits=8).qrange() == (-128, 127)
    assert QScheme(bits=8, signedness="unsigned").qrange() == (0, 255)
    assert QScheme(bits=8, narrow_range=True).qrange() == (-127, 127)
    assert QScheme(bits=4).qrange() == (-8, 7)
    assert QScheme(bits=1).qrange() == (-1, 0)
    assert QScheme(bits=1, signedness="unsigned").qrange() == (0, 1)
    assert QScheme(bits=16).qrange() == (-32768, 32767)


@pytest.mark.parametrize(
    ("observed_min", "signed"), [(-1.0, True), (-1e-30, True), (0.0, False), (0.5, False), (None, True)]
)
def test_qscheme_adaptive_signedness_resolves_from_observed_min(observed_min, signed):
    sc = QScheme(bits=4, signedness="adaptive")
    assert sc.is_signed(observed_min) is signed
    assert sc.qrange(sc.is_signed(observed_min)) == ref_qrange(4, signed)


def test_qscheme_fixed_signedness_ignores_observed_min():
    assert QScheme(signedness="signed").is_signed(3.0) is True
    assert QScheme(signedness="unsigned").is_signed(-3.0) is False


@pytest.mark.parametrize("bits", [0, -1, 17, 32])
def test_qscheme_rejects_out_of_range_bits(bits):
    with pytest.raises(ValidationError):
        QScheme(bits=bits)


def test_qscheme_rejects_narrow_one_bit():
    with pytest.raises(ValidationError, match="narrow_range"):
        QScheme(bits=1, narrow_range=True)


@pytest.mark.parametrize("kwargs", [{"signedness": "both"}, {"granularity": "per_row"},
                                    {"scale_type": "log"}, {"unknown_field": 1}])
def test_qscheme_rejects_bad_fields(kwargs):
    with pytest.raises(ValidationError):
        QScheme(**kwargs)


def test_qscheme_is_frozen():
    sc = QScheme()
    with pytest.raises(ValidationError):
        sc.bits = 4  # type: ignore[misc]
    assert sc.bits == 8


def test_qscheme_is_hashable_and_value_equal():
    a = QScheme(bits=4, symmetric=False, granularity="per_channel", ch_axis=1)
    b = QScheme(bits=4, symmetric=False, granularity="per_channel", ch_axis=1)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, QScheme(bits=4)}) == 2
    assert {a: "x"}[b] == "x"


def test_qscheme_with_bits_copies_and_validates():
    sc = QScheme(bits=8, narrow_range=True)
    assert sc.with_bits(8) is sc
    four = sc.with_bits(4)
    assert four.bits == 4 and four.narrow_range and sc.bits == 8


# ------------------------------------------------------------------------------------------------
# 2. qparams_from_range
# ------------------------------------------------------------------------------------------------
def check_qparams(lo, hi, qmin, qmax, symmetric, pow2=False):
    lo64 = np.asarray(lo, dtype=np.float64)
    hi64 = np.asarray(hi, dtype=np.float64)
    scale, zp = qparams_from_range(t32(lo64), t32(hi64), qmin, qmax, symmetric, pow2)
    s_ref, z_ref, ratio = ref_qparams(np.float32(lo64), np.float32(hi64), qmin, qmax, symmetric, pow2)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert tuple(scale.shape) == lo64.shape == tuple(zp.shape)
    s = scale.numpy().astype(np.float64)
    if pow2:
        # exact powers of two, equal to the reference except where log2(s) is (nearly) an integer
        assert np.all(np.log2(s) == np.rint(np.log2(s)))
        raw, _, _ = ref_qparams(np.float32(lo64), np.float32(hi64), qmin, qmax, symmetric)
        log_tie = np.abs(np.log2(raw) - np.rint(np.log2(raw))) < 1e-6
        assert np.all((s == s_ref) | (log_tie & (np.abs(np.log2(s) - np.log2(s_ref)) <= 1)))
    else:
        np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=0)
    z = zp.numpy().astype(np.int64)
    if ratio is None:
        assert np.all(z == 0)
    else:
        tie = near_tie(ratio)
        assert np.all((z == z_ref) | (tie & (np.abs(z - z_ref) <= 1)))
    assert np.all(s >= EPS32)
    assert np.all((z >= qmin) & (z <= qmax))
    return scale, zp


RANGE_CASES = {
    "random": (np.array([-1.3, -0.2, -5.0, -0.001]), np.array([0.7, 2.2, 5.0, 3.0])),
    "zero": (np.zeros(3), np.zeros(3)),
    "all_negative": (np.array([-4.0, -0.3, -1e-3]), np.array([-1.0, -0.1, -1e-4])),
    "all_positive": (np.array([0.5, 2.0, 1e-3]), np.array([3.0, 2.5, 1.0])),
    "huge_outlier": (np.array([-1.0, -0.01]), np.array([1e6, 3e4])),
    "tiny": (np.array([-1e-12, -3e-9]), np.array([2e-12, 1e-9])),
    "symmetric_tie": (np.array([-1.0, -2.0]), np.array([1.0, 2.0])),
}


@pytest.mark.parametrize("case", sorted(RANGE_CASES))
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize(("symmetric", "signed"), [(True, True), (True, False), (False, False),
                                                   (False, True)])
@pytest.mark.parametrize("pow2", [False, True])
def test_qparams_match_float64_reference(case, bits, symmetric, signed, pow2):
    lo, hi = RANGE_CASES[case]
    qmin, qmax = ref_qrange(bits, signed)
    check_qparams(lo, hi, qmin, qmax, symmetric, pow2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_qparams_random_ranges_per_channel_shapes(bits):
    g = rng(bits)
    for shape in [(), (1,), (7,), (3, 5)]:
        lo = -np.abs(g.standard_normal(shape)) * 10.0 ** g.integers(-3, 3, shape)
        hi = np.abs(g.standard_normal(shape)) * 10.0 ** g.integers(-3, 3, shape)
        for symmetric, signed, narrow in itertools.product((True, False), (True, False), (True, False)):
            if narrow and not signed:
                continue
            qmin, qmax = ref_qrange(bits, signed, narrow)
            check_qparams(lo, hi, qmin, qmax, symmetric)


def test_qparams_zero_range_gives_float32_eps_scale():
    for symmetric, (qmin, qmax) in itertools.product((True, False), ((-128, 127), (0, 255))):
        s, z = qparams_from_range(torch.zeros(4), torch.zeros(4), qmin, qmax, symmetric)
        assert torch.all(s == torch.finfo(torch.float32).eps)
        expect_z = 0 if symmetric else qmin
        assert torch.all(z == expect_z)


def test_qparams_asymmetric_widens_range_to_include_zero():
    # lo > 0: the range becomes [0, hi], so zero is exactly representable (z = qmin)
    s, z = qparams_from_range(t32([2.0]), t32([10.0]), 0, 255, symmetric=False)
    assert s.item() == pytest.approx(10.0 / 255, rel=1e-7)
    assert z.item() == 0
    s, z = qparams_from_range(t32([2.0]), t32([10.0]), -128, 127, symmetric=False)
    assert z.item() == -128
    # hi < 0: the range becomes [lo, 0], z = qmax
    s, z = qparams_from_range(t32([-10.0]), t32([-2.0]), 0, 255, symmetric=False)
    assert s.item() == pytest.approx(10.0 / 255, rel=1e-7)
    assert z.item() == 255
    # zero is on the grid: fake-quantizing 0 gives exactly 0
    for lo, hi in [(2.0, 10.0), (-10.0, -2.0), (-0.37, 1.91)]:
        s, z = qparams_from_range(t32([lo]), t32([hi]), 0, 255, symmetric=False)
        assert fake_quantize(torch.zeros(3), s, z, 0, 255).abs().max().item() == 0.0


def test_qparams_symmetric_signed_is_seed001_eq6():
    # eq. 6: s = max|x| / ((2^t - 1) / 2)
    for bits in (2, 4, 8):
        qmin, qmax = ref_qrange(bits, True)
        s, z = qparams_from_range(t32([-3.0]), t32([1.0]), qmin, qmax, symmetric=True)
        assert s.item() == pytest.approx(3.0 / ((2**bits - 1) / 2), rel=1e-7)
        assert z.item() == 0
    # narrow range: (N_max - N_min) / 2 = 2^(t-1) - 1
    s, _ = qparams_from_range(t32([-3.0]), t32([1.0]), -127, 127, symmetric=True)
    assert s.item() == pytest.approx(3.0 / 127, rel=1e-7)


def test_qparams_symmetric_unsigned_uses_hi_over_nmax():
    s, z = qparams_from_range(t32([-5.0]), t32([2.0]), 0, 15, symmetric=True)
    assert s.item() == pytest.approx(2.0 / 15, rel=1e-7) and z.item() == 0
    s, _ = qparams_from_range(t32([-5.0]), t32([-1.0]), 0, 15, symmetric=True)
    assert s.item() == EPS32  # nothing non-negative to represent


def test_qparams_pow2_rounds_scale_up_to_a_power_of_two():
    qmin, qmax = -128, 127
    for amax, expect in [(127.5 * 0.25, 0.25), (127.5 * 0.3, 0.5), (127.5 * 0.36, 0.5), (127.5 * 0.26, 0.5),
                         (127.5 * 3.0, 4.0), (127.5 * 2.0**-10, 2.0**-10)]:
        s, _ = qparams_from_range(t32([-amax]), t32([amax]), qmin, qmax, symmetric=True, pow2=True)
        assert s.item() == expect


def test_qparams_ignores_grad_and_dtype_of_inputs():
    lo = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    hi = torch.tensor([1.0, 3.0], dtype=torch.float64, requires_grad=True)
    s, z = qparams_from_range(lo, hi, -128, 127, symmetric=True)
    assert s.dtype == torch.float32 and not s.requires_grad and z.dtype == torch.int32


def _torch_observer_qparams(x, signed, bits, per_channel, axis=0):
    qmin, qmax = ref_qrange(bits, signed)
    if signed:
        dtype, qscheme = torch.qint8, (torch.per_channel_symmetric if per_channel
                                       else torch.per_tensor_symmetric)
    else:
        dtype, qscheme = torch.quint8, (torch.per_channel_affine if per_channel
                                        else torch.per_tensor_affine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if per_channel:
            obs = PerChannelMinMaxObserver(ch_axis=axis, dtype=dtype, qscheme=qscheme,
                                           quant_min=qmin, quant_max=qmax)
        else:
            obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax)
        obs(x)
        s, z = obs.calculate_qparams()
    return s, z, qmin, qmax


TORCH_OBS_TENSORS = {
    "randn": lambda g: g.standard_normal((6, 5, 3)) * 2.0,
    "all_negative": lambda g: -np.abs(g.standard_normal((6, 5, 3))) - 0.1,
    "all_positive": lambda g: np.abs(g.standard_normal((6, 5, 3))) + 0.1,
    "outlier": lambda g: np.concatenate([g.standard_normal((5, 5, 3)), np.full((1, 5, 3), 1e4)]),
    "zeros": lambda g: np.zeros((6, 5, 3)),
    "constant": lambda g: np.full((6, 5, 3), 0.75),
}


@pytest.mark.parametrize("case", sorted(TORCH_OBS_TENSORS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False], ids=["qint8_symmetric", "quint8_affine"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_qparams_match_torch_minmax_observers(case, bits, signed, per_channel):
    x = t32(TORCH_OBS_TENSORS[case](rng(7)))
    axis = 0
    s_t, z_t, qmin, qmax = _torch_observer_qparams(x, signed, bits, per_channel, axis)
    if per_channel:
        rows = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo, hi = rows.amin(1), rows.amax(1)
    else:
        lo, hi = x.min().reshape(1), x.max().reshape(1)
    s, z = qparams_from_range(lo, hi, qmin, qmax, symmetric=signed)
    torch.testing.assert_close(s, s_t.to(torch.float32).reshape(s.shape), rtol=1e-6, atol=0)
    assert torch.equal(z.to(torch.int64), z_t.to(torch.int64).reshape(z.shape))


# ------------------------------------------------------------------------------------------------
# 3. fake_quantize / quantize / dequantize
# ------------------------------------------------------------------------------------------------
FQ_GRID = [  # (bits, signed, zero-point picker)
    (2, True, 0), (4, True, 0), (4, False, 3), (8, True, 0), (8, True, -17), (8, False, 128),
    (8, False, 0), (16, True, 0), (16, False, 1000),
]


def _native_fq(x, scale, zp, qmin, qmax, axis):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)


@pytest.mark.parametrize(("bits", "signed", "z0"), FQ_GRID)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_fake_quantize_matches_torch_native_forward_and_grad(bits, signed, z0, axis):
    g = rng(bits * 31 + (axis if axis is not None else 7))
    qmin, qmax = ref_qrange(bits, signed)
    x_np = (g.standard_normal((5, 4, 6)) * 3.0).astype(np.float32)
    if axis is None:
        scale = t32(g.uniform(0.01, 0.5))
        zp = torch.tensor(z0, dtype=torch.int32)
    else:
        c = x_np.shape[axis]
        scale = t32(g.uniform(0.01, 0.5, c))
        zp = torch.tensor(np.clip(z0 + g.integers(-2, 3, c), qmin, qmax), dtype=torch.int32)
    # a third of the values scaled up so that both clamping ends are hit
    x_np[..., :2] *= float(2 ** (bits - 1) / 2.0)
    x = torch.tensor(x_np, requires_grad=True)
    x_native = torch.tensor(x_np, requires_grad=True)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis)
    ref = _native_fq(x_native, scale, zp, qmin, qmax, axis)
    assert out.dtype == torch.float32
    assert torch.equal(out, ref), "forward differs from torch's native kernel"
    upstream = torch.tensor(g.standard_normal(x_np.shape).astype(np.float32))
    out.backward(upstream)
    ref.backward(upstream)
    assert torch.equal(x.grad, x_native.grad), "gradient differs from torch's native kernel"
    n_pass = int((x.grad != 0).sum())
    assert 0 < n_pass < x.numel()  # both in-range and clamped values were exercised


@pytest.mark.parametrize(("bits", "signed", "z0"), FQ_GRID)
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_fake_quantize_matches_float64_reference_except_near_ties(bits, signed, z0, axis):
    """Bit-equal to a float64 numpy reference except where x/s sits within ~1e-6 of a .5 tie.

    The kernel (like torch's native one) computes ``x * float32(1/s)`` rather than a correctly
    rounded ``x / s``; those differ by an ulp or two, which changes the rounding only at ties. At
    such points the kernel must still agree with torch's native kernel.
    """
    g = rng(1000 + bits * 7 + (axis if axis is not None else 5))
    qmin, qmax = ref_qrange(bits, signed)
    if axis is None:
        s_np = np.float32(g.uniform(0.05, 0.3))
        zp = torch.tensor(z0, dtype=torch.int32)
    else:
        s_np = g.uniform(0.05, 0.3, (8, 6, 50)[axis]).astype(np.float32)
        zp = torch.tensor(np.clip(z0 + g.integers(-2, 3, s_np.shape[0]), qmin, qmax), dtype=torch.int32)
    # |x/s| mostly below 2^(bits-1), some beyond: both clamps are hit, and for 16 bits the ~1e-6
    # relative tie zone stays a small fraction of the values
    x_np = (g.standard_normal((8, 6, 50)) * 2.0 ** (bits - 2) * float(np.mean(s_np))).astype(np.float32)
    # plant exact float64 ties k + 0.5 (as close as float32 allows) in the first row
    k = g.integers(qmin, qmax + 1, x_np.shape[-1]) - (int(zp.flatten()[0]))
    s_first = np.asarray(s_np, dtype=np.float64).reshape(-1)[0]
    x_np[0, 0, :] = ((k + 0.5) * s_first).astype(np.float32)
    scale = t32(s_np)
    x = torch.tensor(x_np, requires_grad=True)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis)
    out.backward(torch.ones_like(x))
    ref, mask, v = ref_fake_quant(x_np, s_np, zp.numpy(), qmin, qmax, axis)
    tie = near_tie(v)
    got = out.detach().numpy()
    assert tie[1:].mean() < 0.1 and tie[0, 0].mean() > 0.9
    assert 0 < mask.mean() < 1
    np.testing.assert_array_equal(got[~tie], ref.astype(np.float32)[~tie])
    np.testing.assert_array_equal(x.grad.numpy()[~tie], mask.astype(np.float32)[~tie])
    # near ties: within one step of the reference and identical to torch's native kernel
    step = np.broadcast_to(np.asarray(s_np, dtype=np.float64).reshape(
        [-1 if i == axis else 1 for i in range(3)] if axis is not None else ()), x_np.shape)
    ulp_out = 2 * EPS32 * np.abs(ref[tie])  # the float32 output itself is rounded
    assert np.all(np.abs(got[tie] - ref[tie]) <= step[tie] + ulp_out)
    native = _native_fq(torch.tensor(x_np), scale, zp, qmin, qmax, axis)
    assert torch.equal(out.detach(), native)


@pytest.mark.parametrize(("x", "expected"), [
    (0.5, 0.0), (1.5, 2.0), (2.5, 2.0), (3.5, 4.0), (-0.5, 0.0), (-1.5, -2.0), (-2.5, -2.0),
    (0.49, 0.0), (0.51, 1.0), (-0.51, -1.0),
])
def test_fake_quantize_rounds_half_to_even(x, expected):
    for fn in (lambda t: fake_quantize(t, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), -128, 127),
               lambda t: quantize(t, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), -128, 127)):
        assert fn(torch.tensor([x])).item() == expected
    # power-of-two scale keeps the tie exact
    half = fake_quantize(torch.tensor([x * 0.5]), torch.tensor(0.5), torch.tensor(0, dtype=torch.int32),
                         -128, 127)
    assert half.item() == expected * 0.5


def test_fake_quantize_negative_half_gives_zero_like_torch():
    # round(-0.5) = -0.0 and adding the zero-point gives +0.0, as torch's integer kernel does
    x = torch.tensor([-0.5, -0.2])
    out = fake_quantize(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), -128, 127)
    native = torch.fake_quantize_per_tensor_affine(x, 1.0, 0, -128, 127)
    assert torch.equal(out, torch.zeros(2))
    assert torch.equal(torch.signbit(out), torch.signbit(native))


def test_fake_quantize_rounds_before_adding_zero_point():
    # q = round(x/s) + z: 0.5 -> round(0.5) + 3 = 3 -> 0.0  (round(0.5 + 3) would give 4 -> 1.0)
    out = fake_quantize(torch.tensor([0.5, 1.5]), torch.tensor(1.0), torch.tensor(3, dtype=torch.int32),
                        0, 15)
    assert out.tolist() == [0.0, 2.0]
    assert quantize(torch.tensor([0.5, 1.5]), torch.tensor(1.0), torch.tensor(3, dtype=torch.int32),
                    0, 15).tolist() == [3.0, 5.0]


@pytest.mark.parametrize(("qmin", "qmax", "z"), [(-128, 127, 0), (0, 255, 100), (-8, 7, 2), (0, 3, 0)])
def test_fake_quantize_clamps_both_ends(qmin, qmax, z):
    s = torch.tensor(0.1)
    zt = torch.tensor(z, dtype=torch.int32)
    x = torch.tensor([-1e9, -1e4, float("-inf"), 1e4, 1e9, float("inf")])
    out = fake_quantize(x, s, zt, qmin, qmax)
    lo, hi = (qmin - z) * s, (qmax - z) * s
    assert out[:3].tolist() == [lo.item()] * 3
    assert out[3:].tolist() == [hi.item()] * 3
    assert quantize(x, s, zt, qmin, qmax).tolist() == [qmin] * 3 + [qmax] * 3


def test_fake_quantize_gradient_mask_at_the_boundaries():
    # scale 1, z 0, range [-8, 7]: round(7.5) = 8 is out; round(-8.5) = -8 (half to even) is in
    x = torch.tensor([7.4, 7.5, 8.0, -8.0, -8.5, -8.6, -9.0, 0.0, 3.3, 1e6, -1e6], requires_grad=True)
    out = fake_quantize(x, torch.tensor(1.0), torch.tensor(0, dtype=torch.int32), -8, 7)
    out.sum().backward()
    assert x.grad.tolist() == [1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    x2 = x.detach().clone().requires_grad_(True)
    torch.fake_quantize_per_tensor_affine(x2, 1.0, 0, -8, 7).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_fake_quantize_gradient_is_zero_outside_one_inside_random():
    g = rng(3)
    x_np = (g.standard_normal((4, 3, 20)) * 3).astype(np.float32)
    s = np.array([0.02, 0.05, 0.1], dtype=np.float32)
    z = np.array([0, 5, -3], dtype=np.int32)
    x = torch.tensor(x_np, requires_grad=True)
    fake_quantize(x, torch.tensor(s), torch.tensor(z), -64, 63, axis=1).sum().backward()
    _, mask, v = ref_fake_quant(x_np, s, z, -64, 63, axis=1)
    tie = near_tie(v)
    assert set(np.unique(x.grad.numpy())) <= {0.0, 1.0}
    assert 0.1 < mask.mean() < 0.9
    np.testing.assert_array_equal(x.grad.numpy()[~tie], mask[~tie].astype(np.float32))


def test_fake_quantize_gradient_flows_only_to_x():
    s = torch.tensor(0.1, requires_grad=True)
    x = torch.randn(10, requires_grad=True)
    fake_quantize(x, s, torch.tensor(0, dtype=torch.int32), -128, 127).sum().backward()
    assert x.grad is not None and s.grad is None


ADVERSARIAL = {
    "all_equal": lambda: torch.full((4, 8), 0.37),
    "all_zero": lambda: torch.zeros(4, 8),
    "all_negative": lambda: -torch.linspace(0.01, 3.0, 32).reshape(4, 8),
    "one_outlier": lambda: torch.cat([torch.linspace(-1, 1, 31), torch.tensor([1e5])]).reshape(4, 8),
    "all_equal_negative": lambda: torch.full((4, 8), -2.5),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize(("bits", "signed", "symmetric"), [(8, True, True), (8, False, False),
                                                          (4, False, True), (4, True, False)])
@pytest.mark.parametrize("axis", [None, 0])
def test_fake_quantize_adversarial_tensors(case, bits, signed, symmetric, axis):
    x = ADVERSARIAL[case]()
    qmin, qmax = ref_qrange(bits, signed)
    if axis is None:
        lo, hi = x.min().reshape(1), x.max().reshape(1)
    else:
        lo, hi = x.amin(1), x.amax(1)
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric)
    xg = x.clone().requires_grad_(True)
    out = fake_quantize(xg, scale, zp, qmin, qmax, axis)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xg.grad).all()
    native = _native_fq(x, scale if axis is not None else scale.reshape(()),
                        zp if axis is not None else zp.reshape(()), qmin, qmax, axis)
    assert torch.equal(out.detach(), native)
    ref, _, v = ref_fake_quant(x.numpy(), scale.numpy(), zp.numpy(), qmin, qmax, axis)
    tie = near_tie(v)
    np.testing.assert_array_equal(out.detach().numpy()[~tie], ref.astype(np.float32)[~tie])
    if case == "all_zero":
        assert torch.equal(out.detach(), torch.zeros_like(x))
    # the error is within half a step wherever the value lies inside the representable range
    s_b = scale.reshape(-1, 1) if axis == 0 else scale
    z_b = zp.reshape(-1, 1) if axis == 0 else zp
    inside = (x >= (qmin - z_b) * s_b) & (x <= (qmax - z_b) * s_b)
    err = (out.detach() - x).abs()
    assert torch.all(err[inside] <= (0.5 * s_b.expand_as(x))[inside] * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize(("bits", "signed", "z0"), FQ_GRID)
@pytest.mark.parametrize("axis", [None, 1])
def test_quantize_dequantize_roundtrip_on_grid_is_exact(bits, signed, z0, axis):
    g = rng(50 + bits)
    qmin, qmax = ref_qrange(bits, signed)
    n = qmax - qmin + 1
    codes = np.arange(qmin, qmax + 1) if n <= 4096 else np.unique(np.concatenate(
        [np.arange(qmin, qmin + 100), np.arange(qmax - 100, qmax + 1), g.integers(qmin, qmax + 1, 3000)]))
    if axis is None:
        scale = t32(g.uniform(1e-3, 2.0))
        zp = torch.tensor(z0, dtype=torch.int32)
        q = torch.tensor(codes, dtype=torch.float32)
    else:
        scale = t32(g.uniform(1e-3, 2.0, 3))
        zp = torch.tensor(np.clip([z0, z0 + 1, z0 - 1], qmin, qmax), dtype=torch.int32)
        q = torch.tensor(np.stack([codes] * 3), dtype=torch.float32)
        q = torch.stack([q, q])  # (2, 3, n): channel axis 1
    x = dequantize(q, scale, zp, axis)
    assert torch.equal(quantize(x, scale, zp, qmin, qmax, axis), q)
    assert torch.equal(dequantize(quantize(x, scale, zp, qmin, qmax, axis), scale, zp, axis), x)
    assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax, axis), x)


def test_quantize_returns_integral_codes_in_range():
    g = rng(9)
    x = torch.tensor(g.standard_normal(1000).astype(np.float32) * 5)
    q = quantize(x, torch.tensor(0.03), torch.tensor(7, dtype=torch.int32), -8, 7)
    assert q.dtype == torch.float32
    assert torch.equal(q, q.round()) and q.min() >= -8 and q.max() <= 7


def test_per_channel_single_channel_and_negative_axis():
    g = rng(11)
    x = torch.tensor(g.standard_normal((2, 3, 4)).astype(np.float32))
    s = t32([0.1, 0.2, 0.05])
    z = torch.tensor([0, 1, -1], dtype=torch.int32)
    assert torch.equal(fake_quantize(x, s, z, -8, 7, axis=-2), fake_quantize(x, s, z, -8, 7, axis=1))
    x1 = x[:, :1]
    assert torch.equal(fake_quantize(x1, s[:1], z[:1], -8, 7, axis=1),
                       fake_quantize(x1, s[0], z[0], -8, 7))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "signed", "axis"), [(8, True, None), (8, False, 1), (4, True, 0),
                                                      (4, False, None)])
def test_fake_quantize_half_precision_inputs(dtype, bits, signed, axis):
    g = rng(21 + bits)
    qmin, qmax = ref_qrange(bits, signed)
    x32 = torch.tensor(g.standard_normal((6, 5, 10)).astype(np.float32) * 2).to(dtype).float()
    x = x32.to(dtype).requires_grad_(True)
    if axis is None:
        lo, hi = x32.min().reshape(1), x32.max().reshape(1)
    else:
        rows = x32.movedim(axis, 0).reshape(x32.shape[axis], -1)
        lo, hi = rows.amin(1), rows.amax(1)
    scale, zp = qparams_from_range(lo, hi, qmin, qmax, symmetric=signed)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis)
    assert out.dtype == dtype
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    ref = fake_quantize(x32, scale, zp, qmin, qmax, axis)
    step = scale if axis is None else scale.reshape([-1 if i == axis else 1 for i in range(3)])
    assert torch.all((out.float() - ref).abs() <= step)
    # computed in float32 and cast (as torch's kernel): equal to the fp32 result rounded to dtype
    assert torch.equal(out.detach(), ref.to(dtype))
    native = _native_fq(x.detach(), scale if axis is not None else scale.reshape(()),
                        zp if axis is not None else zp.reshape(()), qmin, qmax, axis)
    assert torch.equal(out.detach(), native)
    codes = quantize(x.detach(), scale, zp, qmin, qmax, axis)
    assert codes.dtype == dtype
    assert torch.equal(codes.float(), quantize(x32, scale, zp, qmin, qmax, axis))


# ------------------------------------------------------------------------------------------------
# 4. ternary / binary weight quantizers (seed 003 eq. 3-5)
# ------------------------------------------------------------------------------------------------
WEIGHT_SHAPES = [(16, 8, 3, 3), (10, 32), (4, 1, 5, 5), (3, 7)]


def _check_against_ref(w_np: np.ndarray, out: torch.Tensor, ternary: bool, threshold: float = 0.7):
    ref = ref_binary_weights(w_np, ternary, threshold)
    got = out.detach().numpy().astype(np.float64)
    if ternary:
        m = np.abs(w_np.astype(np.float64).reshape(w_np.shape[0], -1)).mean(1).reshape(
            -1, *([1] * (w_np.ndim - 1)))
        near = np.abs(np.abs(w_np) - threshold * m) <= 1e-6 * m
    else:
        near = np.zeros(w_np.shape, dtype=bool)
    np.testing.assert_allclose(got[~near], ref[~near], rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_ternary_matches_float64_reference(shape, seed):
    w_np = (rng(seed).standard_normal(shape) * 0.1).astype(np.float32)
    out = ternary_quantize(torch.tensor(w_np))
    _check_against_ref(w_np, out, ternary=True)
    for i in range(shape[0]):
        vals = torch.unique(out[i])
        m = out[i].abs().max()
        assert len(vals) <= 3
        assert set(vals.tolist()) <= {-m.item(), 0.0, m.item()}


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_ternary_threshold_argument(threshold):
    w_np = rng(4).standard_normal((6, 20)).astype(np.float32)
    _check_against_ref(w_np, ternary_quantize(torch.tensor(w_np), threshold), True, threshold)


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_binary_matches_float64_reference(shape, seed):
    w_np = (rng(seed + 10).standard_normal(shape) * 0.1).astype(np.float32)
    out = binary_quantize(torch.tensor(w_np))
    _check_against_ref(w_np, out, ternary=False)
    for i in range(shape[0]):
        vals = torch.unique(out[i])
        assert len(vals) == 2 and vals[0].item() == -vals[1].item()


def test_binary_maps_zero_to_plus_mean_and_ternary_zero_filter_to_zero():
    w = torch.tensor([[0.0, 1.0, -3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    b = binary_quantize(w)
    assert b[0].tolist() == [1.0, 1.0, -1.0, 1.0]
    assert b[1].tolist() == [0.0] * 4
    t = ternary_quantize(w)
    # |W_bar| = 1, threshold 0.7: 1.0 kept, -3.0 kept, zeros dropped
    assert t[0].tolist() == [0.0, 1.0, -1.0, 0.0]
    assert t[1].tolist() == [0.0] * 4


@pytest.mark.parametrize("fn", [ternary_quantize, binary_quantize])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_binary_ternary_ste_gradient_is_identity(fn, dtype):
    g = rng(5)
    w = torch.tensor(g.standard_normal((8, 4, 3, 3)), dtype=dtype, requires_grad=True)
    upstream = torch.tensor(g.standard_normal((8, 4, 3, 3)), dtype=dtype)
    out = fn(w)
    assert out.dtype == dtype
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


@pytest.mark.parametrize("fn", [ternary_quantize, binary_quantize])
def test_binary_ternary_forward_value_is_exact_with_grad(fn):
    # the STE must not perturb the forward value (w + (wq - w).detach() would, by an ulp)
    w_np = rng(6).standard_normal((32, 64)).astype(np.float32)
    with_grad = fn(torch.tensor(w_np, requires_grad=True))
    without = fn(torch.tensor(w_np))
    assert torch.equal(with_grad.detach(), without)
    for i in range(32):
        assert len(torch.unique(with_grad[i].detach())) <= (3 if fn is ternary_quantize else 2)
