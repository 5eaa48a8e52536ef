"""KLD on spiky distributions (issue 17) and the clipping warning of every calibrator.

A point mass anywhere in the histogram (the normalised background of an image, exact zeros after a
ReLU) or a sparse per-channel weight row must not drive the KL search to a threshold that clips most of
the data; a calibrator that does clip more than the stated share warns, naming the quantizer.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from quantbench.observers import OBSERVERS, build_observer
from quantbench.observers.base import CLIP_WARN_ACTIVATIONS, CLIP_WARN_WEIGHTS, ClippingWarning
from quantbench.observers.kld import suppress_spikes
from quantbench.quant.scheme import QScheme


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scheme(bits: int = 4, symmetric: bool = True, per_channel: bool = False) -> QScheme:
    return QScheme(bits=bits, symmetric=symmetric, signedness="adaptive",
                   granularity="per_channel" if per_channel else "per_tensor", ch_axis=0)


def clipped_share(x: np.ndarray, obs) -> float:
    """Share of ``x`` (per-tensor) whose code ``x / s + z`` lies more than one step outside
    ``[qmin, qmax]`` (its clamping error exceeds twice the largest rounding error), in float64."""
    s, z, qmin, qmax = obs.calculate_qparams()
    s, z = float(s[0]), float(z[0])
    q = x.astype(np.float64) / s + z
    tol = 1e-6 * max(abs(qmin), abs(qmax))
    return float(np.mean((q < qmin - 1 - tol) | (q > qmax + 1 + tol)))


def digits_like(n: int = 20000, seed: int = 0) -> np.ndarray:
    """17 grey levels normalised like the digits input: half the pixels are background (level 0), a point
    mass at -mean/std = -0.81, the rest spread over the other levels."""
    r = np.random.default_rng(seed)
    levels = r.integers(1, 17, n)
    levels[r.random(n) < 0.5] = 0
    return ((levels / 16.0 - 0.305) / 0.376).astype(np.float32)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_kld_point_mass_at_a_nonzero_value_keeps_the_range(symmetric, bits):
    x = digits_like()
    obs = build_observer("kld", scheme(bits, symmetric))
    obs.layer_name = "x_in"
    obs.observe(torch.from_numpy(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClippingWarning)  # nothing worth warning about
        share = clipped_share(x, obs)
    assert share < CLIP_WARN_ACTIVATIONS
    lo, hi = obs.compute_range()
    assert float(lo) <= -0.8 and float(hi) >= 0.9 * float(x.max())  # the background and the strokes fit


@pytest.mark.parametrize("symmetric", [True, False])
def test_kld_point_mass_at_zero_after_relu(symmetric):
    r = np.random.default_rng(1)
    x = np.maximum(r.normal(-0.3, 1.0, 50000), 0).astype(np.float32)  # ~62 % exact zeros
    obs = build_observer("kld", scheme(8, symmetric))
    obs.observe(torch.from_numpy(x))
    _, hi = obs.compute_range()
    # Not driven to isolate the spike: the range keeps the bulk of the positive values.
    assert float(hi) >= np.quantile(x[x > 0], 0.99)
    assert clipped_share(x, obs) < CLIP_WARN_ACTIVATIONS


def test_kld_point_mass_inside_a_continuous_distribution():
    r = np.random.default_rng(2)
    x = r.normal(0.0, 1.0, 40000)
    x[: 16000] = 1.7  # a 40 % spike at 1.7, e.g. a saturated activation
    x = x.astype(np.float32)
    obs = build_observer("kld", scheme(4, True))
    obs.observe(torch.from_numpy(x))
    _, hi = obs.compute_range()
    assert float(hi) >= 1.7
    assert clipped_share(x, obs) < CLIP_WARN_ACTIVATIONS


def test_kld_sparse_per_channel_rows_are_not_clipped_to_a_sliver():
    """144 values per channel (ResNet-20's first stage) on 2048 bins: a row's histogram is nearly empty and
    a threshold keeping one nonzero bin had KL = 0, clipping 99 % of a 4-bit channel (range / 200)."""
    w = np.random.default_rng(3).normal(0.0, 0.05, (16, 144)).astype(np.float32)
    for bits in (4, 8):
        obs = build_observer("kld", scheme(bits, True, per_channel=True), is_weight=True)
        obs.observe(torch.from_numpy(w))
        lo, hi = obs.compute_range()
        amax = np.abs(w).max(1)
        assert np.all(hi.numpy() >= 0.4 * amax), hi.numpy() / amax
        assert np.all(lo.numpy() <= -0.4 * amax)
        clipped = (np.abs(w) > hi.numpy()[:, None]).mean(1)
        assert clipped.max() < CLIP_WARN_WEIGHTS


def test_suppress_spikes_caps_any_dominant_bin_at_its_nearest_nonzero_neighbour():
    h = torch.tensor([[500.0, 10, 0, 0, 12, 0, 9000, 0, 11, 8, 7, 0],
                      [3.0, 4, 2, 0, 0, 5, 0, 0, 0, 0, 0, 1],   # sparse: nothing is a spike
                      [0.0, 0, 0, 0, 0, 70, 0, 0, 0, 0, 0, 0]])  # one nonzero bin: left alone
    out = suppress_spikes(h.to(torch.float64))
    expected = h.clone()
    expected[0, 0] = 10   # the spike at 0 (NVIDIA's bins[0] = bins[1])
    expected[0, 6] = 12   # a spike anywhere: its larger nearest nonzero neighbour (12 left, 11 right)
    torch.testing.assert_close(out, expected.to(torch.float64), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# the clipping warning, for every calibrator
# ------------------------------------------------------------------------------------------------
@pytest.mark.fault(input="a calibrator that clips more than 5 % of a quantizer's activations "
                         "(e.g. quantile alpha=0.9)",
                   message="quantizer 'stage1.relu': the 'quantile' calibration clips 10.0% of the observed "
                           "activations (more than 5%) ...", exit_code=0,
                   kept="the run completes; one ClippingWarning and log line per quantizer")
def test_clipping_more_than_the_share_warns_once_and_logs_naming_the_quantizer(caplog):
    x = torch.from_numpy(np.random.default_rng(4).normal(0, 1, 20000).astype(np.float32))
    obs = build_observer("quantile", scheme(8, True), alpha=0.9)
    obs.layer_name = "stage1.relu"
    obs.observe(x)
    pattern = r"'stage1\.relu'.*'quantile'.*clips \d+\.\d% of the observed activations"
    logger = "quantbench.observers.base"
    with caplog.at_level(logging.INFO, logger=logger), pytest.warns(ClippingWarning, match=pattern):
        obs.calculate_qparams()
    assert any("stage1.relu" in r.getMessage() for r in caplog.records)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClippingWarning)
        obs.calculate_qparams()  # once per quantizer


@pytest.mark.fault(input="a weight calibrator that clips more than 10 % of a weight row",
                   message="quantizer 'conv1.weight': the 'quantile' calibration clips ... of the observed "
                           "weights (more than 10%) ...", exit_code=0,
                   kept="the run completes; one warning per quantizer")
def test_weight_clipping_uses_the_weight_threshold():
    w = torch.from_numpy(np.random.default_rng(5).normal(0, 1, (4, 500)).astype(np.float32))
    mild = build_observer("quantile", scheme(8, True, per_channel=True), is_weight=True, alpha=0.93)
    mild.observe(w)  # clips ~7 %: under the weights' 10 %, over the activations' 5 %
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClippingWarning)
        mild.calculate_qparams()
    assert CLIP_WARN_ACTIVATIONS < 0.07 < CLIP_WARN_WEIGHTS
    bad = build_observer("quantile", scheme(8, True, per_channel=True), is_weight=True, alpha=0.8)
    bad.layer_name = "conv1.weight"
    bad.observe(w)
    with pytest.warns(ClippingWarning, match=r"'conv1\.weight'.*weights \(more than 10%\)"):
        bad.calculate_qparams()


@pytest.mark.parametrize("name", sorted(OBSERVERS.names()))
def test_every_observer_measures_its_clipping(name):
    """Every calibrator reports the share it clips (checked against a float64 count on the data)."""
    x = np.random.default_rng(6).normal(0.2, 1.0, (2, 3000)).astype(np.float32)
    obs = build_observer(name, scheme(2, False))
    for part in np.array_split(x, 2, axis=1):
        obs.observe(torch.from_numpy(np.ascontiguousarray(part)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClippingWarning)
        s, z, qmin, qmax = obs.calculate_qparams()
        worst = obs.check_clipping(s, z, qmin, qmax)
        ref = clipped_share(x.reshape(-1), obs)
    # histograms count a bin as clipped by its center: within a few percent of the exact share
    assert abs(worst - ref) <= (0.0 if name == "minmax" else 0.02), (worst, ref)
