"""Ternary and binary weight quantizers (seed 003 eq. 3-5) against a float64 reference, and their straight-through
gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.qat.quantizers.ternary import binary_quantize, ternary_quantize
from tests.numerics_ref import (
    ref_binary_weights,
    rng,
)

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
