"""fake_quantize / quantize / dequantize against torch's native kernels and a float64 reference (round half to
even, zero-point after rounding, clamping, straight-through gradients, adversarial tensors, half precision)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.quant.fake_quant import dequantize, fake_quantize, quantize
from quantbench.quant.qparams import qparams_from_range
from tests.numerics_ref import (
    EPS32,
    near_tie,
    ref_fake_quant,
    ref_qrange,
    rng,
    t32,
)

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
