"""Numerics of the quantization primitives against independent references: QScheme and qparams_from_range
(fake quantization: test_fake_quant.py; binary / ternary weights: test_binary_ternary.py).

References used here:

* the formulas of seed 001 (section E integer ranges, eq. 6-7 scale / zero-point) and seed 003
  (eq. 3 ternary, eq. 4 binary), re-implemented in float64 numpy in tests/numerics_ref.py;
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

from quantbench.quant.fake_quant import fake_quantize
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.scheme import QScheme
from tests.numerics_ref import (
    EPS32,
    near_tie,
    ref_qparams,
    ref_qrange,
    rng,
    t32,
)


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
