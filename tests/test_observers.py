"""Calibration observers (seed 001 section C.1) against independent float64 numpy references.

References (in tests/observers_ref.py, numpy float64):

* quantile: ``np.quantile`` (linear interpolation) of ``x`` / ``|x|``;
* mse: a direct search over the same candidate grid (``t_k = max|x| k / K`` symmetric, ``[min k/K,
  max k/K]`` asymmetric) with numpy fake quantization;
* kld: a straightforward per-candidate loop building ``P`` and ``Q`` bin by bin (TensorRT / MXNet
  entropy calibration), run on a histogram that is itself checked against ``np.histogram``;
* norm: LSQ's ``2 mean|x| / sqrt(N_max)``; meanstd: ``np.mean`` / ``np.std``.

Exact paths (weights, norm, meanstd) agree to 1e-5 relative; histogram paths (activations) to within
one bin width of the observer's final histogram.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.errors import ConfigError, EmptyCalibrationError, NonFiniteError, UnknownNameError
from quantbench.observers import OBSERVERS, build_observer
from quantbench.observers.histogram import MergeableHistogram
from tests.observers_ref import (
    BITS_CASES,
    CASE_NAMES,
    EPS32,
    NEW_OBSERVERS,
    RANGE_CASES,
    assert_hist_matches_np,
    assert_qparams_match_range,
    make_data,
    obs_range,
    observe,
    resolved_qrange,
    rows_of,
    scheme_for,
)

pytestmark = [pytest.mark.filterwarnings("ignore::quantbench.observers.base.ClippingWarning"),  # adversarial grids
              pytest.mark.usefixtures("torch_one_thread")]


# ------------------------------------------------------------------------------------------------
# 1. the mergeable histogram
# ------------------------------------------------------------------------------------------------
def _hist_batches(seed: int) -> list[np.ndarray]:
    """(3, n) batches whose ranges grow down, up, both ways, from zero and stay put."""
    r = np.random.default_rng(seed)
    b0 = np.stack([np.zeros(500), r.uniform(0.1, 0.2, 500), r.normal(0, 1, 500)])
    b1 = np.stack([r.normal(0, 1, 700), r.uniform(-0.5, 0.3, 700), r.normal(0, 1, 700) * 1e-3])
    b2 = np.stack([r.normal(5, 2, 300), r.uniform(-40, 90, 300), r.normal(0, 1, 300) * 1e3])
    b3 = np.stack([np.zeros(50), r.uniform(-1e-3, 1e-3, 50), np.full(50, -7e4)])
    return [b.astype(np.float32) for b in (b0, b1, b2, b3)]


@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("bins", [2048, 10])
def test_histogram_merge_conserves_counts_and_matches_np_histogram_on_final_grid(absolute, bins):
    h = MergeableHistogram(bins, absolute=absolute)
    batches = _hist_batches(0)
    for b in batches:
        h.add(torch.from_numpy(b))
    data = np.concatenate(batches, axis=1).astype(np.float64)
    if absolute:
        data = np.abs(data)
    counts, edges = h.counts.numpy(), h.edges().numpy()
    np.testing.assert_array_equal(counts.sum(1), data.shape[1])
    for c in range(data.shape[0]):
        assert edges[c, 0] <= data[c].min() and data[c].max() < edges[c, -1]
        assert edges[c, 0] <= 0 <= edges[c, -1]
        assert_hist_matches_np(counts[c], data[c], edges[c])
        if absolute:
            assert edges[c, 0] == 0


def test_histogram_grid_stays_aligned_to_zero_and_doubles_width():
    h = MergeableHistogram(16)
    h.add(torch.tensor([[0.0, 1.0]]))
    w0 = float(h.width[0])
    h.add(torch.tensor([[-3.0, 5.0]]))
    w1 = float(h.width[0])
    ratio = w1 / w0
    assert ratio == 2 ** round(np.log2(ratio)) and ratio >= 8
    assert float(h.offset[0]) == round(float(h.offset[0]))  # 0 is an edge
    assert h.counts.sum() == 4


def test_histogram_of_only_zeros_then_data_keeps_the_zero_mass():
    h = MergeableHistogram(8)
    h.add(torch.zeros(2, 5))
    assert torch.all(h.width == 0) and torch.all(h.counts[:, 0] == 5)
    h.add(torch.tensor([[-1.0, 2.0], [0.0, 0.0]]))
    edges = h.edges().numpy()
    assert_hist_matches_np(h.counts[0].numpy(), np.array([0, 0, 0, 0, 0, -1.0, 2.0]), edges[0])
    assert h.width[1] == 0 and h.counts[1, 0] == 7


def test_histogram_quantile_is_within_one_bin_of_np_quantile():
    x = make_data("normal", 3, (4, 5000))
    h = MergeableHistogram(2048)
    for part in np.array_split(x, 3, axis=1):
        h.add(torch.from_numpy(np.ascontiguousarray(part)))
    w = h.width.numpy()
    for q in (0.0, 1e-4, 0.1, 0.5, 0.9999, 1.0):
        ref = np.quantile(x.astype(np.float64), q, axis=1)
        assert np.all(np.abs(h.quantile(q).numpy() - ref) <= w)


def test_histogram_rejects_odd_bins_and_changed_channel_count():
    with pytest.raises(ConfigError):
        MergeableHistogram(7)
    h = MergeableHistogram(8)
    h.add(torch.ones(2, 3))
    with pytest.raises(ValueError, match="channel count"):
        h.add(torch.ones(3, 3))


# ------------------------------------------------------------------------------------------------
# 2. quantile
# ------------------------------------------------------------------------------------------------
def ref_quantile_range(rows: np.ndarray, symmetric: bool, alpha: float):
    mn, mx = rows.min(1), rows.max(1)
    if symmetric:
        amax = np.quantile(np.abs(rows), alpha, axis=1)
        lo, hi = -amax, amax
    else:
        lo, hi = np.quantile(rows, 1 - alpha, axis=1), np.quantile(rows, alpha, axis=1)
    return np.clip(lo, mn, mx), np.clip(hi, mn, mx)


@pytest.mark.parametrize(CASE_NAMES, **RANGE_CASES)
def test_quantile_weights_are_exact(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("quantile", x, sc, is_weight=True)
    lo_ref, hi_ref = ref_quantile_range(rows_of(x, per_channel), symmetric, 0.9999)
    lo, hi = obs_range(obs)
    np.testing.assert_allclose(lo, lo_ref, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(hi, hi_ref, rtol=1e-5, atol=1e-12)
    assert_qparams_match_range(obs, lo_ref, hi_ref, x, sc)


@pytest.mark.parametrize(CASE_NAMES, **RANGE_CASES)
def test_quantile_activations_within_one_bin(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits + 10)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("quantile", x, sc, batches=2)
    lo_ref, hi_ref = ref_quantile_range(rows_of(x, per_channel), symmetric, 0.9999)
    lo, hi = obs_range(obs)
    w = obs.hist.width.numpy() * (1 + 1e-6) + 1e-6 * np.maximum(np.abs(lo_ref), np.abs(hi_ref)) + 1e-6 * np.abs(hi_ref)
    assert np.all(np.abs(lo - lo_ref) <= w) and np.all(np.abs(hi - hi_ref) <= w)


def test_quantile_alpha_option_and_torch_quantile_agreement():
    x = make_data("normal", 1, (64, 50))
    sc = scheme_for(8, False, True, signedness="signed")
    sc = sc.model_copy(update={"ch_axis": 0})
    obs = build_observer("quantile", sc, is_weight=True, alpha=0.9)
    obs.observe(torch.from_numpy(x))
    lo, hi = obs.compute_range()
    t = torch.from_numpy(x)
    torch.testing.assert_close(hi, torch.quantile(t, 0.9, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lo, torch.quantile(t, 1 - 0.9, dim=1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 5. norm and meanstd
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(CASE_NAMES, **BITS_CASES)
def test_norm_is_lsq_scale(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits + 50)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("norm", x, sc, batches=3)
    rows = rows_of(x, per_channel)
    qmin, qmax = resolved_qrange(x, sc)
    s_ref = np.maximum(2 * np.abs(rows).mean(1) / np.sqrt(qmax), EPS32)
    s, z, _, _ = obs.calculate_qparams()
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-5)
    if symmetric:
        assert np.all(z.numpy() == 0)
    else:
        width = s_ref * (qmax - qmin)
        lo = np.maximum(np.minimum(rows.min(1), 0), -width)
        z_ref = np.clip(qmin - np.rint(lo / s_ref), qmin, qmax)
        assert np.abs(z.numpy() - z_ref).max() <= 1


def test_norm_p_option():
    x = make_data("normal", 0)
    s3 = observe("norm", x, scheme_for(4, True, False), p=3.0).calculate_qparams()[0]
    expected = 2 * np.abs(x.astype(np.float64)).mean() / 7 ** (1 / 3)
    np.testing.assert_allclose(s3.numpy(), [expected], rtol=1e-6)


def ref_meanstd_range(rows: np.ndarray, symmetric: bool, alpha: float):
    mu, sd = rows.mean(1), rows.std(1)
    lo, hi = mu - alpha * sd, mu + alpha * sd
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        return -amax, amax
    return np.clip(lo, rows.min(1), rows.max(1)), np.clip(hi, rows.min(1), rows.max(1))


@pytest.mark.parametrize(CASE_NAMES, **RANGE_CASES)
def test_meanstd_matches_numpy(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits + 60)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("meanstd", x, sc, batches=3)
    lo_ref, hi_ref = ref_meanstd_range(rows_of(x, per_channel), symmetric, 3.0)
    lo, hi = obs_range(obs)
    np.testing.assert_allclose(lo, lo_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi, hi_ref, rtol=1e-5, atol=1e-6)
    assert_qparams_match_range(obs, lo_ref, hi_ref, x, sc)


def test_meanstd_alpha_option_and_large_offset_is_stable():
    x = (make_data("normal", 1, (3, 10000)).astype(np.float64) * 1e-3 + 1e4).astype(np.float32)
    sc = scheme_for(8, False, True).model_copy(update={"ch_axis": 0})
    obs = build_observer("meanstd", sc, alpha=2.6)
    for part in np.array_split(x, 7, axis=1):
        obs.observe(torch.from_numpy(np.ascontiguousarray(part)))
    mu, sd = obs.mean_std()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu.numpy(), x64.mean(1), rtol=1e-12)
    np.testing.assert_allclose(sd.numpy(), x64.std(1), rtol=1e-9)
    lo, hi = obs_range(obs)
    lo_ref, hi_ref = ref_meanstd_range(x64, False, 2.6)
    np.testing.assert_allclose(lo, lo_ref, rtol=1e-6)
    np.testing.assert_allclose(hi, hi_ref, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# 7. errors and options
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*NEW_OBSERVERS, "minmax"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises_naming_the_layer(name, bad):
    obs = build_observer(name, scheme_for(8, True, False))
    obs.layer_name = "stage2.conv1.act"
    x = torch.randn(4, 5)
    x[1, 2] = bad
    with pytest.raises(NonFiniteError, match=r"stage2\.conv1\.act"):
        obs.observe(x)


@pytest.mark.parametrize("name", NEW_OBSERVERS)
@pytest.mark.parametrize("is_weight", [False, True])
def test_observer_without_data_raises_empty_calibration(name, is_weight):
    obs = build_observer(name, scheme_for(8, False, True), is_weight=is_weight)
    obs.layer_name = "fc"
    with pytest.raises(EmptyCalibrationError, match="fc"):
        obs.calculate_qparams()
    obs.observe(torch.empty(0, 3))  # an empty batch is no data either
    with pytest.raises(EmptyCalibrationError):
        obs.compute_range()


@pytest.mark.parametrize("name", NEW_OBSERVERS)
def test_unknown_option_raises_type_error(name):
    with pytest.raises(TypeError, match="unknown option"):
        build_observer(name, scheme_for(8, True, False), bogus=1)


@pytest.mark.parametrize(("name", "options"), [
    ("quantile", {"alpha": 0.3}), ("quantile", {"alpha": 1.5}), ("quantile", {"bins": 7}),
    ("mse", {"num_candidates": 0}), ("mse", {"bins": 1}), ("kld", {"bins": 2049}),
    ("norm", {"p": 0}), ("meanstd", {"alpha": -1.0}),
])
def test_invalid_option_values_raise_config_error(name, options):
    with pytest.raises(ConfigError):
        build_observer(name, scheme_for(8, True, False), **options)


def test_unknown_observer_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        build_observer("nope", scheme_for(8, True, False))
    msg = str(info.value)
    assert "nope" in msg
    for name in [*NEW_OBSERVERS, "minmax", "ema_minmax"]:
        assert name in msg
    assert set(NEW_OBSERVERS) <= set(OBSERVERS.names())


# ------------------------------------------------------------------------------------------------
# 8. extremes: bit-widths 1 and 16, adaptive signedness, weights observed repeatedly
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW_OBSERVERS)
@pytest.mark.parametrize("bits", [1, 16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("is_weight", [True, False])
def test_every_bit_width_gives_finite_qparams(name, bits, symmetric, is_weight):
    x = make_data("normal", bits)
    obs = observe(name, x, scheme_for(bits, symmetric, True), batches=1 if is_weight else 2,
                  is_weight=is_weight)
    s, z, qmin, qmax = obs.calculate_qparams()
    assert torch.all(torch.isfinite(s)) and torch.all(s > 0)
    assert torch.all((z >= qmin) & (z <= qmax))


@pytest.mark.parametrize("name", ["quantile", "mse"])
def test_weight_observer_uses_the_latest_tensor(name):
    sc = scheme_for(4, True, False)
    obs = build_observer(name, sc, is_weight=True)
    w = torch.from_numpy(make_data("normal", 0))
    for _ in range(3):  # a weight quantizer sees the same tensor once per calibration batch
        obs.observe(w)
    once = build_observer(name, sc, is_weight=True)
    once.observe(w)
    torch.testing.assert_close(obs.calculate_qparams()[0], once.calculate_qparams()[0], rtol=0, atol=0)
