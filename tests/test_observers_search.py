"""The searching observers, mse and kld, against per-candidate float64 references, and the accumulation of every
observer across batches (see test_observers.py for the references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.observers import build_observer
from quantbench.quant.qparams import qparams_from_range
from tests.observers_ref import (
    BITS_CASES,
    CASE_NAMES,
    NEW_OBSERVERS,
    chosen_errors,
    make_data,
    obs_range,
    observe,
    ref_errors,
    ref_kld_range,
    ref_kld_search,
    ref_mse_candidates,
    ref_qparams,
    resolved_qrange,
    rows_of,
    scheme_for,
)

pytestmark = [pytest.mark.filterwarnings("ignore::quantbench.observers.base.ClippingWarning"),  # adversarial grids
              pytest.mark.usefixtures("torch_one_thread")]


# ------------------------------------------------------------------------------------------------
# 3. mse
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(CASE_NAMES, **BITS_CASES)
def test_mse_weights_minimise_exact_error_over_the_candidate_grid(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits + 20)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("mse", x, sc, is_weight=True)
    rows = rows_of(x, per_channel)
    qmin, qmax = resolved_qrange(x, sc)
    lo_c, hi_c = ref_mse_candidates(rows, symmetric, 100)
    s_c, z_c = ref_qparams(lo_c, hi_c, qmin, qmax, symmetric)
    best = ref_errors(rows, s_c, z_c, qmin, qmax).min(1)
    got = chosen_errors(obs, rows)
    np.testing.assert_allclose(got, best, rtol=1e-5, atol=1e-9)
    # the chosen range is one of the candidates
    lo, hi = obs_range(obs)
    k = np.argmin(np.abs(hi_c - hi[:, None]) + np.abs(lo_c - lo[:, None]), axis=1)
    np.testing.assert_allclose(hi, hi_c[np.arange(len(k)), k], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize(CASE_NAMES, **BITS_CASES)
def test_mse_activations_from_histogram_match_exact_search(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits + 30)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("mse", x, sc, batches=3)
    rows = rows_of(x, per_channel)
    qmin, qmax = resolved_qrange(x, sc)
    lo_c, hi_c = ref_mse_candidates(rows, symmetric, 100)
    s_c, z_c = ref_qparams(lo_c, hi_c, qmin, qmax, symmetric)
    err = ref_errors(rows, s_c, z_c, qmin, qmax)
    k_ref = err.argmin(1)
    got = chosen_errors(obs, rows)
    lo, hi = obs_range(obs)
    w = obs.hist.width.numpy()
    idx = np.arange(rows.shape[0])
    same = (np.abs(hi - hi_c[idx, k_ref]) <= w) & (np.abs(lo - lo_c[idx, k_ref]) <= w)
    # within one bin of the exact optimum, or (flat error curve) an equally good candidate
    assert np.all(same | (got <= err.min(1) * 1.01 + 1e-9))


@pytest.mark.parametrize("kind", ["normal", "relu", "outlier", "heavy"])
@pytest.mark.parametrize(("symmetric", "narrow", "pow2"), [(True, True, False), (True, False, True),
                                                          (False, False, True)])
def test_mse_uses_the_real_integer_range_narrow_and_pow2(kind, symmetric, narrow, pow2):
    x = make_data(kind, 7)
    sc = scheme_for(4, symmetric, True, narrow_range=narrow, scale_type="pow2" if pow2 else "float")
    obs = observe("mse", x, sc, is_weight=True)
    rows = rows_of(x, True)
    qmin, qmax = resolved_qrange(x, sc)
    lo_c, hi_c = ref_mse_candidates(rows, symmetric, 100)
    # the quantizer's own scale rule (incl. pow2) is what MSE must optimise through
    s_t, z_t = qparams_from_range(torch.tensor(lo_c, dtype=torch.float32),
                                  torch.tensor(hi_c, dtype=torch.float32), qmin, qmax, symmetric, pow2)
    best = ref_errors(rows, s_t.double().numpy(), z_t.double().numpy(), qmin, qmax).min(1)
    np.testing.assert_allclose(chosen_errors(obs, rows), best, rtol=1e-5, atol=1e-9)
    if pow2:
        s = obs.calculate_qparams()[0].numpy()
        np.testing.assert_array_equal(np.log2(s), np.round(np.log2(s)))


@pytest.mark.parametrize("is_weight", [True, False])
@pytest.mark.parametrize("kind", ["normal", "relu", "outlier", "heavy", "uniform"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_error_is_at_most_minmax_error(kind, bits, is_weight):
    x = make_data(kind, bits)
    for symmetric in (True, False):
        sc = scheme_for(bits, symmetric, False)
        rows = rows_of(x, False)
        mse = chosen_errors(observe("mse", x, sc, batches=1 if is_weight else 2, is_weight=is_weight), rows)
        minmax = chosen_errors(observe("minmax", x, sc), rows)
        assert np.all(mse <= minmax * (1 + (1e-6 if is_weight else 1e-2)))


def test_mse_num_candidates_option():
    x = make_data("normal", 0)
    obs = observe("mse", x, scheme_for(4, True, False), is_weight=True, num_candidates=7)
    _, hi = obs_range(obs)
    amax = np.abs(x).max()
    assert np.any(np.isclose(hi[0], amax * np.arange(1, 8) / 7, rtol=1e-6))


# ------------------------------------------------------------------------------------------------
# 4. kld
# ------------------------------------------------------------------------------------------------
def assert_kld_matches_reference(obs, x: np.ndarray, sc, per_channel: bool) -> None:
    """The observer's range equals the per-candidate loop reference within one histogram bin."""
    qmin, qmax = resolved_qrange(x, sc)
    levels = qmax + 1 if sc.symmetric else qmax - qmin + 1
    lo_ref, hi_ref = ref_kld_range(obs, rows_of(x, per_channel), sc.symmetric, levels)
    lo, hi = obs_range(obs)
    w = obs.hist.width.numpy() * (1 + 1e-6) + 1e-6 * np.maximum(np.abs(lo_ref), np.abs(hi_ref))
    assert np.all(np.abs(lo - lo_ref) <= w) and np.all(np.abs(hi - hi_ref) <= w)


@pytest.mark.parametrize(CASE_NAMES, **BITS_CASES)
def test_kld_matches_per_candidate_loop_reference(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits + 40)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("kld", x, sc, batches=2, bins=512)
    assert_kld_matches_reference(obs, x, sc, per_channel)


@pytest.mark.parametrize(("symmetric", "bits"), [(True, 8), (True, 4), (False, 8), (False, 2)])
def test_kld_default_2048_bins_matches_reference(symmetric, bits):
    x = make_data("relu" if symmetric else "normal", 5, (20000,))
    sc = scheme_for(bits, symmetric, False)
    obs = observe("kld", x, sc)
    assert_kld_matches_reference(obs, x, sc, False)


def test_kld_divergences_equal_the_loop_reference():
    x = make_data("heavy", 2, (30000,))
    obs = observe("kld", x, scheme_for(4, False, False), bins=256)
    kl, s, e = obs.search()
    hist, edges = obs.hist.counts.numpy()[0], obs.hist.edges().numpy()[0]
    a = int(np.searchsorted(edges, min(x.min(), 0), side="right") - 1)
    b = int(np.searchsorted(edges, max(x.max(), 0), side="right"))
    z0 = int(np.searchsorted(edges, 0.0, side="right") - 1)
    kl_ref, s_ref, e_ref = ref_kld_search(hist, a, b, z0, 16)
    np.testing.assert_array_equal(s[0].numpy(), s_ref)
    np.testing.assert_array_equal(e[0].numpy(), e_ref)
    np.testing.assert_allclose(kl[0].numpy(), kl_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_kld_divergences_on_sparse_histograms_fuzz(symmetric):
    """Empty bins, empty levels and outliers landing on empty edge bins (the eps path)."""
    r = np.random.default_rng(17)
    for trial in range(25):
        support = r.uniform(-3, 5, r.integers(2, 12))
        x = r.choice(support, size=(2, 300)).astype(np.float32)
        x[:, 0] = r.uniform(-30, 40, 2)  # outliers
        bits = int(r.integers(1, 4))
        sc = scheme_for(bits, symmetric, True).model_copy(update={"ch_axis": 0})
        obs = observe("kld", x, sc, batches=1, bins=32)
        kl, s, e = obs.search()
        qmin, qmax = obs.qrange()
        levels = qmax + 1 if symmetric else qmax - qmin + 1
        hist, edges = obs.hist.counts.numpy(), obs.hist.edges().numpy()
        data = np.abs(x.astype(np.float64)) if symmetric else x.astype(np.float64)
        for c in range(2):
            lo_d, hi_d = (0.0, data[c].max()) if symmetric else (min(data[c].min(), 0), max(data[c].max(), 0))
            a = int(np.searchsorted(edges[c], lo_d, side="right") - 1)
            b = int(np.searchsorted(edges[c], hi_d, side="right"))
            z0 = int(np.searchsorted(edges[c], 0.0, side="right") - 1)
            kl_ref, s_ref, e_ref = ref_kld_search(hist[c], a, b, z0, levels)
            k = len(kl_ref)
            assert np.all(np.isinf(kl[c, k:].numpy())), trial
            np.testing.assert_array_equal(s[c, :k].numpy(), s_ref)
            np.testing.assert_array_equal(e[c, :k].numpy(), e_ref)
            np.testing.assert_allclose(kl[c, :k].numpy(), kl_ref, rtol=1e-9, atol=1e-12, err_msg=str(trial))


def test_kld_symmetric_matches_tensorrt_on_np_histogram():
    """Fully independent: np.histogram(|x|, 2048, [0, max|x|]) + TensorRT's loop."""
    x = make_data("heavy", 11, (50000,)).astype(np.float64)
    a = np.abs(x)
    hist, edges = np.histogram(a, bins=2048, range=(0, a.max()))
    kl, _, e = ref_kld_search(hist.astype(np.float64), 0, 2048, 0, 128)
    t_ref = edges[e[np.argmin(kl)]]
    obs = observe("kld", x.astype(np.float32), scheme_for(8, True, False, signedness="signed"))
    _, hi = obs_range(obs)
    assert abs(hi[0] - min(t_ref, x.max())) <= 1.5 * float(obs.hist.width[0])


@pytest.mark.parametrize("bits", [4, 8])
def test_kld_clips_heavy_tailed_tensor(bits):
    x = make_data("heavy", 3, (40000,))
    for symmetric in (True, False):
        obs = observe("kld", x, scheme_for(bits, symmetric, False), batches=4)
        lo, hi = obs_range(obs)
        assert hi[0] < 0.5 * x.max()
        if not symmetric:
            assert lo[0] > 0.5 * x.min()


# ------------------------------------------------------------------------------------------------
# 6. accumulation across batches
# ------------------------------------------------------------------------------------------------
def _growing_batches() -> list[np.ndarray]:
    """A narrow batch first, then wider ones: the merged histogram has to grow."""
    r = np.random.default_rng(9)
    parts = [r.normal(0, 0.5, (6, 3, 10, 10)), r.normal(0.5, 1, (6, 3, 10, 10)),
             r.normal(0, 1, (6, 3, 10, 10)) * np.linspace(1, 3, 3)[None, :, None, None],
             r.standard_t(2, (6, 3, 10, 10))]
    return [p.astype(np.float32) for p in parts]


@pytest.mark.parametrize("name", ["minmax", "norm", "meanstd"])
@pytest.mark.parametrize(("per_channel", "symmetric"), [(False, True), (True, False)])
def test_exact_accumulation_equals_one_big_batch(name, per_channel, symmetric):
    batches = _growing_batches()
    sc = scheme_for(4, symmetric, per_channel)
    many = build_observer(name, sc)
    for b in batches:
        many.observe(torch.from_numpy(b))
    one = observe(name, np.concatenate(batches), sc)
    s1, z1, *_ = many.calculate_qparams()
    s2, z2, *_ = one.calculate_qparams()
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["quantile", "mse"])
@pytest.mark.parametrize(("per_channel", "symmetric"), [(False, True), (False, False), (True, True)])
def test_histogram_accumulation_matches_one_big_batch(name, per_channel, symmetric):
    batches = _growing_batches()
    sc = scheme_for(8, symmetric, per_channel)
    many = build_observer(name, sc)
    for b in batches:
        many.observe(torch.from_numpy(b))
    one = observe(name, np.concatenate(batches), sc)
    lo1, hi1 = obs_range(many)
    lo2, hi2 = obs_range(one)
    w = np.maximum(many.hist.width.numpy(), one.hist.width.numpy()) * (1 + 1e-6)
    if name == "mse":  # both pick a candidate of the same grid; the bin-center errors may tie-break
        rows = rows_of(np.concatenate(batches), per_channel)
        e1, e2 = chosen_errors(many, rows), chosen_errors(one, rows)
        assert np.all((np.abs(hi1 - hi2) <= w) | (np.abs(e1 - e2) <= 1e-2 * e2))
    else:
        assert np.all(np.abs(lo1 - lo2) <= w) and np.all(np.abs(hi1 - hi2) <= w)
    assert many.hist.total().tolist() == one.hist.total().tolist()


@pytest.mark.parametrize(("per_channel", "symmetric"), [(False, True), (False, False), (True, True)])
def test_kld_accumulation_equals_kld_of_all_data_on_the_merged_grid(per_channel, symmetric):
    """KLD is a function of the histogram: the merged one is np.histogram of every batch on the final
    grid (checked inside ref_kld_range), so the result is the reference KLD of all the data. (Against
    a single batch binned on its own finer grid, the flat KL curve of a Gaussian can move the
    threshold by more than a bin, so that is only checked loosely.)"""
    batches = _growing_batches()
    sc = scheme_for(4, symmetric, per_channel)
    many = build_observer("kld", sc, bins=512)
    for b in batches:
        many.observe(torch.from_numpy(b))
    x = np.concatenate(batches)
    assert_kld_matches_reference(many, x, sc, per_channel)
    lo, hi = obs_range(many)
    lo1, hi1 = obs_range(observe("kld", x, sc, bins=512))
    amax = np.abs(rows_of(x, per_channel)).max(1)
    assert np.all(np.abs(hi - hi1) <= 0.15 * amax) and np.all(np.abs(lo - lo1) <= 0.15 * amax)


@pytest.mark.parametrize("name", NEW_OBSERVERS)
def test_accumulation_differs_from_keeping_the_widest_batch(name):
    r = np.random.default_rng(4)
    wide = r.normal(0, 4, (1, 2000)).astype(np.float32)  # one small, wide batch
    narrow = [r.normal(0.5, 1, (1, 20000)).astype(np.float32) for _ in range(3)]
    batches = [narrow[0], wide, *narrow[1:]]
    sc = scheme_for(4, False, False)
    merged = build_observer(name, sc, alpha=0.99) if name == "quantile" else build_observer(name, sc)
    for b in batches:
        merged.observe(torch.from_numpy(b))
    opts = {"alpha": 0.99} if name == "quantile" else {}
    one = observe(name, np.concatenate(batches, axis=1), sc, **opts)
    widest = observe(name, wide, sc, **opts)
    last = observe(name, batches[-1], sc, **opts)
    s_m, s_one, s_w, s_l = (o.calculate_qparams()[0].item() for o in (merged, one, widest, last))
    assert s_m == pytest.approx(s_one, rel=0.03)
    assert abs(s_m - s_w) > 0.1 * s_m
    assert abs(s_m - s_l) > 0.01 * s_m or name == "mse"


