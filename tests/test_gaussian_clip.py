"""Seed 003's Gaussian-optimal weight clipping (eq. 1, App. B): c_b against a float64 quadrature, its stability
across sigma, lower MSE than min-max on Gaussian filters, and the learning rule's codes and gradient."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from quantbench.qat.quantizers import ALGORITHMS, QuantizerContext
from quantbench.qat.quantizers.gaussian import GaussianWeight
from quantbench.qat.quantizers.ternary import TernaryWeight
from quantbench.quant.gaussian_clip import gaussian_clip_ratio, gaussian_clip_scale, simulate_clip_ratio
from quantbench.quant.scheme import QScheme

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def quadrature_ratio(bits: int) -> float:
    """Independent reference: the expected squared error of eq. 1's quantizer on N(0, 1) by float64 quadrature
    (midpoint rule on [-12, 12]), minimised over a dense grid of clipping values; c = E|W| / a* = sqrt(2/pi) / a*."""
    x = np.linspace(-12, 12, 120_001)
    dx = x[1] - x[0]
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    levels = 2 ** (bits - 1) - 1

    def err(a: float) -> float:
        s = a / levels
        q = np.round(np.clip(x, -a, a) / s) * s
        return float(np.sum((q - x) ** 2 * pdf) * dx)

    grid = np.linspace(0.5, 8.0, 301)  # coarse, then fine around the best
    best = float(grid[int(np.argmin([err(a) for a in grid]))])
    fine = np.linspace(best - 0.05, best + 0.05, 201)
    return math.sqrt(2 / math.pi) / float(fine[int(np.argmin([err(a) for a in fine]))])


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
def test_the_simulated_ratio_matches_a_float64_quadrature(bits):
    assert gaussian_clip_ratio(bits) == pytest.approx(quadrature_ratio(bits), rel=0.01)


@pytest.mark.parametrize("bits", range(3, 9))
def test_the_ratio_is_stable_across_sigma(bits):
    ratios = [simulate_clip_ratio(bits, sigma, n=1 << 18, seed=1) for sigma in (0.01, 0.1, 1.0)]
    assert max(ratios) / min(ratios) < 1.001
    assert ratios[0] == pytest.approx(gaussian_clip_ratio(bits), rel=0.01)  # other samples, the same c_b


def test_the_ratios_grow_with_the_bits():
    """More levels: the optimal clipping moves out (a*/sigma grows), so c_b = E|W| / a* falls."""
    ratios = [gaussian_clip_ratio(b) for b in range(3, 9)]
    assert all(a > b for a, b in itertools.pairwise(ratios))


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_gaussian_clipping_beats_min_max_on_gaussian_filters(bits):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 3 * 3 * 64, generator=g) * torch.rand(64, 1, generator=g)
    levels = 2 ** (bits - 1) - 1

    def mse(scale: torch.Tensor) -> float:
        s = scale.reshape(-1, 1)
        return float((torch.clamp(torch.round(w / s), -levels, levels) * s - w).square().mean())

    assert mse(gaussian_clip_scale(w, bits)) < mse(w.abs().amax(dim=1) / levels)


def test_the_learning_rule_quantizes_per_filter_with_an_identity_gradient():
    scheme = QScheme(bits=4, symmetric=True, signedness="signed", granularity="per_channel")
    alg = ALGORITHMS.get("gaussian")
    qmin, qmax = scheme.qrange()
    rule = alg.build(QuantizerContext(scheme, qmin, qmax, True, "w", True, 8), alg.parse_options({}))
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    y = rule(w)
    s = gaussian_clip_scale(w, 4).reshape(-1, 1, 1, 1)
    codes = y.detach() / s
    assert torch.allclose(codes, torch.round(codes), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
    assert max(row.unique().numel() for row in y.detach().reshape(8, -1)) <= 15
    y.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # eq. 5
    scale, zero = rule.export_qparams()
    assert torch.allclose(scale, s.reshape(-1)) and not zero.any()
    two = QScheme(bits=2, symmetric=True, signedness="signed", granularity="per_channel")
    ctx2 = QuantizerContext(two, *two.qrange(), True, "w", True, 8)
    with pytest.raises(ValueError, match="at least 3 bits"):  # the rule itself; the algorithm picks ternary at 2
        GaussianWeight(ctx2, alg.parse_options({}))
    assert isinstance(alg.build(ctx2, alg.parse_options({})), TernaryWeight)
