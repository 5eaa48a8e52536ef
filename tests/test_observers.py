"""Calibration observers (seed 001 section C.1) against independent float64 numpy references.

References (all written here, in numpy float64):

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

import itertools

import numpy as np
import pytest
import torch

from quantbench.errors import ConfigError, EmptyCalibrationError, NonFiniteError, UnknownNameError
from quantbench.observers import OBSERVERS, build_observer
from quantbench.observers.histogram import MergeableHistogram
from quantbench.observers.kld import KLD_EPS
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.scheme import QScheme

pytestmark = pytest.mark.filterwarnings("ignore::quantbench.observers.base.ClippingWarning")  # adversarial grids

EPS32 = float(np.finfo(np.float32).eps)
NEW_OBSERVERS = ["quantile", "mse", "kld", "norm", "meanstd"]
KINDS = ["normal", "uniform", "relu", "equal", "zero", "outlier", "negative"]
BITS = [2, 4, 8]
SHAPE = (2, 3, 40, 25)  # per-channel along axis 1: C = 3 rows of 2000 values
CH_AXIS = 1


# ------------------------------------------------------------------------------------------------
# data and helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP spin-waiting, which makes the module
    several times slower on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_data(kind: str, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    r = np.random.default_rng(seed)
    if kind == "normal":
        x = r.normal(0.3, 1.5, shape)
    elif kind == "uniform":
        x = r.uniform(-1.0, 3.0, shape)
    elif kind == "relu":
        x = np.maximum(r.normal(0.0, 1.0, shape), 0.0)
    elif kind == "equal":
        x = np.full(shape, 0.7)
    elif kind == "zero":
        x = np.zeros(shape)
    elif kind == "outlier":
        x = r.normal(0.0, 1.0, shape)
        x.flat[r.integers(x.size)] = 1e4
    elif kind == "negative":
        x = -r.uniform(0.5, 3.0, shape)
    elif kind == "heavy":
        x = r.standard_t(2.0, shape)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


def scheme_for(bits: int, symmetric: bool, per_channel: bool, **kw) -> QScheme:
    return QScheme(bits=bits, symmetric=symmetric, signedness=kw.pop("signedness", "adaptive"),
                   granularity="per_channel" if per_channel else "per_tensor", ch_axis=CH_AXIS, **kw)


def rows_of(x: np.ndarray, per_channel: bool) -> np.ndarray:
    """The observer's (C, n) view, in float64."""
    x = np.asarray(x, dtype=np.float64)
    if per_channel:
        return np.moveaxis(x, CH_AXIS, 0).reshape(x.shape[CH_AXIS], -1)
    return x.reshape(1, -1)


def ref_qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1


def ref_qparams(lo, hi, qmin: int, qmax: int, symmetric: bool):
    """Float scale / zero-point in float64 (seed 001 eq. 6-7; scale floored at float32 eps)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)
    if symmetric:
        if qmin < 0:
            s = np.maximum(np.maximum(np.maximum(-lo, hi), 0.0) / ((qmax - qmin) / 2.0), EPS32)
        else:
            s = np.maximum(np.maximum(hi, 0.0) / qmax, EPS32)
        return s, np.zeros_like(s)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = np.maximum((hi - lo) / (qmax - qmin), EPS32)
    return s, np.clip(qmin - np.rint(lo / s), qmin, qmax)


def ref_fake_quant(x, s, z, qmin: int, qmax: int) -> np.ndarray:
    """Round half to even, add z, clamp, dequantize; s / z broadcast against x."""
    return (np.clip(np.rint(x / s) + z, qmin, qmax) - z) * s


def observe(name: str, x: np.ndarray, scheme: QScheme, batches: int = 1, is_weight: bool = False,
            **options):
    obs = build_observer(name, scheme, is_weight=is_weight, **options)
    for part in np.array_split(x, batches, axis=0):
        obs.observe(torch.from_numpy(np.ascontiguousarray(part)))
    return obs


def resolved_qrange(x: np.ndarray, scheme: QScheme) -> tuple[int, int]:
    signed = scheme.is_signed(float(np.min(x)))
    return ref_qrange(scheme.bits, signed, scheme.narrow_range)


def obs_range(obs) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = obs.compute_range()
    return lo.numpy().astype(np.float64), hi.numpy().astype(np.float64)


def assert_qparams_match_range(obs, lo, hi, x, scheme, rtol=1e-5):
    """The observer's scale / zero-point are the reference qparams of the reference range."""
    qmin, qmax = resolved_qrange(x, scheme)
    s, z, oqmin, oqmax = obs.calculate_qparams()
    assert (oqmin, oqmax) == (qmin, qmax)
    s_ref, z_ref = ref_qparams(np.float32(lo), np.float32(hi), qmin, qmax, scheme.symmetric)
    np.testing.assert_allclose(s.numpy(), s_ref, rtol=rtol, atol=0)
    assert np.abs(z.numpy() - z_ref).max() <= 1  # a .5 tie of lo/s may round either way


SCHEMES = list(itertools.product([False, True], [True, False]))  # (per_channel, symmetric)
DIST_KINDS = [k for k in KINDS if k not in ("equal", "zero")]
CONST_KINDS = ["equal", "zero"]  # adversarial constant inputs: once per observer and scheme, at one width


def _grid(bits_matter: bool) -> list[tuple[bool, bool, int, str]]:
    """(per_channel, symmetric, bits, kind) cases. Observers whose range depends on the bit-width (mse,
    kld, norm) see every distribution at every width; for quantile and meanstd (bit-width only enters
    ``qparams_from_range``, tested in test_numerics) the distributions rotate through the widths.
    Constant inputs run once per scheme at 4 bits in both."""
    if bits_matter:
        dist = [(pc, sym, b, k) for pc, sym in SCHEMES for b in BITS for k in DIST_KINDS]
    else:
        dist = [(pc, sym, BITS[i % len(BITS)], k) for pc, sym in SCHEMES for i, k in enumerate(DIST_KINDS)]
    return dist + [(pc, sym, 4, k) for pc, sym in SCHEMES for k in CONST_KINDS]


def _ids(grid: list[tuple[bool, bool, int, str]]) -> list[str]:
    return [f"{'pc' if pc else 'pt'}-{'sym' if s else 'asym'}-b{b}-{k}" for pc, s, b, k in grid]


GRID_BITS = _grid(True)
GRID_RANGE = _grid(False)
BITS_CASES = {"argvalues": GRID_BITS, "ids": _ids(GRID_BITS)}
RANGE_CASES = {"argvalues": GRID_RANGE, "ids": _ids(GRID_RANGE)}
CASE_NAMES = ("per_channel", "symmetric", "bits", "kind")


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



def assert_hist_matches_np(counts: np.ndarray, data: np.ndarray, edges: np.ndarray) -> None:
    """``counts`` equals ``np.histogram(data, edges)`` except that a value within float32 rounding of an
    edge may be counted in the neighbouring bin (the counting pass runs in float32)."""
    expected, _ = np.histogram(data, bins=edges)
    assert counts.sum() == expected.sum() == data.size
    width = edges[1] - edges[0]
    pos = data / width
    near_edge = int(np.sum(np.abs(pos - np.rint(pos)) <= 1e-5 * np.maximum(1.0, np.abs(pos))))
    assert np.abs(counts - expected).sum() <= 2 * near_edge, (counts - expected).nonzero()

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
# 3. mse
# ------------------------------------------------------------------------------------------------
def ref_mse_candidates(rows: np.ndarray, symmetric: bool, k: int):
    ks = np.arange(1, k + 1) / k
    mn, mx = rows.min(1), rows.max(1)
    if symmetric:
        amax = np.maximum(np.maximum(-mn, mx), 0.0)
        return -amax[:, None] * ks, amax[:, None] * ks
    return mn[:, None] * ks, mx[:, None] * ks


def ref_errors(rows: np.ndarray, s: np.ndarray, z: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Squared error (C, K) of every candidate quantizer s, z (C, K)."""
    xq = ref_fake_quant(rows[:, None, :], s[..., None], z[..., None], qmin, qmax)
    return ((xq - rows[:, None, :]) ** 2).sum(-1)


def chosen_errors(obs, rows: np.ndarray) -> np.ndarray:
    s, z, qmin, qmax = obs.calculate_qparams()
    s = s.numpy().astype(np.float64)[:, None]
    z = z.numpy().astype(np.float64)[:, None]
    return ((ref_fake_quant(rows, s, z, qmin, qmax) - rows) ** 2).sum(1)


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
def ref_suppress_spikes(hist: np.ndarray, ratio: float = 4.0, share: float = 0.01) -> np.ndarray:
    """Bin-by-bin loop: a bin holding ``share`` of the values and above ``ratio`` x its larger nearest
    nonzero neighbour takes that count."""
    h = np.array(hist, dtype=np.float64, copy=True)
    nz = np.flatnonzero(h)
    out = h.copy()
    for j in range(len(h)):
        left, right = nz[nz < j], nz[nz > j]
        neigh = max(h[left[-1]] if len(left) else 0.0, h[right[0]] if len(right) else 0.0)
        if neigh > 0 and h[j] > ratio * neigh and h[j] >= share * h.sum():
            out[j] = neigh
    return out


def ref_kld_search(hist: np.ndarray, a: int, b: int, z0: int, levels: int):
    """Per-candidate loop: returns (divergences, starts, ends) over n = L .. b - a kept bins.

    Generalising NVIDIA pytorch-quantization's ``bins[0] = bins[1]``, every spike (a bin holding more
    than 4x the larger count of its nearest nonzero neighbours and >= 1 % of the values) first takes
    that count, so no point mass drives the search; a candidate keeping a single nonzero bin (P == Q)
    gets ``inf`` unless the row has only one nonzero bin."""
    hist = ref_suppress_spikes(hist)
    nd = b - a
    kls, starts, ends = [], [], []
    row_nonzero = int(np.count_nonzero(hist))
    for n in range(levels, nd + 1):
        s = z0 - round(n * (z0 - a) / nd)
        e = s + n
        kept = hist[s:e]
        if np.count_nonzero(kept) < 2 <= row_nonzero:
            kls.append(np.inf)
            starts.append(s)
            ends.append(e)
            continue
        p = kept.copy()
        p[0] += hist[:s].sum()
        p[-1] += hist[e:].sum()
        level = (np.arange(n) * levels) // n  # kept bin j -> level floor(j L / n)
        mass = np.bincount(level, weights=kept, minlength=levels)
        nonzero = np.bincount(level, weights=(p > 0).astype(np.float64), minlength=levels)
        q = np.where(p > 0, mass[level] / np.maximum(nonzero[level], 1), 0.0)
        p = p / p.sum()
        q = q / q.sum() if q.sum() > 0 else q
        q[(p > 0) & (q == 0)] = KLD_EPS
        m = p > 0
        kls.append(float(np.sum(p[m] * np.log(p[m] / q[m]))))
        starts.append(s)
        ends.append(e)
    return np.array(kls), np.array(starts), np.array(ends)


def ref_kld_range(obs, rows: np.ndarray, symmetric: bool, levels: int):
    """Reference range on the observer's histogram (checked against np.histogram first)."""
    hist, edges = obs.hist.counts.numpy(), obs.hist.edges().numpy()
    data = np.abs(rows) if symmetric else rows
    los, his = [], []
    for c in range(rows.shape[0]):
        if edges[c, -1] > 0:  # (a row of zeros is a point mass at 0 in bin 0)
            assert_hist_matches_np(hist[c], data[c], edges[c])
        mn, mx = rows[c].min(), rows[c].max()
        lo_d, hi_d = (0.0, max(-mn, mx)) if symmetric else (min(mn, 0.0), max(mx, 0.0))
        a = int(np.searchsorted(edges[c], lo_d, side="right") - 1)
        b = int(np.searchsorted(edges[c], hi_d, side="right"))
        z0 = int(np.searchsorted(edges[c], 0.0, side="right") - 1)
        lo, hi = lo_d if not symmetric else -hi_d, hi_d
        if b - a >= levels and edges[c, -1] > 0:
            kl, s, e = ref_kld_search(hist[c], a, b, z0, levels)
            k = int(np.argmin(kl))
            hi = edges[c, e[k]]
            lo = -hi if symmetric else edges[c, s[k]]
        los.append(np.clip(lo, mn, mx))
        his.append(np.clip(hi, mn, mx))
    return np.array(los), np.array(his)


@pytest.mark.parametrize(CASE_NAMES, **BITS_CASES)
def test_kld_matches_per_candidate_loop_reference(per_channel, symmetric, bits, kind):
    x = make_data(kind, bits + 40)
    sc = scheme_for(bits, symmetric, per_channel)
    obs = observe("kld", x, sc, batches=2, bins=512)
    rows = rows_of(x, per_channel)
    qmin, qmax = resolved_qrange(x, sc)
    levels = qmax + 1 if symmetric else qmax - qmin + 1
    lo_ref, hi_ref = ref_kld_range(obs, rows, symmetric, levels)
    lo, hi = obs_range(obs)
    w = obs.hist.width.numpy() * (1 + 1e-6) + 1e-6 * np.maximum(np.abs(lo_ref), np.abs(hi_ref))
    assert np.all(np.abs(lo - lo_ref) <= w) and np.all(np.abs(hi - hi_ref) <= w)


@pytest.mark.parametrize(("symmetric", "bits"), [(True, 8), (True, 4), (False, 8), (False, 2)])
def test_kld_default_2048_bins_matches_reference(symmetric, bits):
    x = make_data("relu" if symmetric else "normal", 5, (20000,))
    sc = scheme_for(bits, symmetric, False)
    obs = observe("kld", x, sc)
    rows = rows_of(x, False)
    qmin, qmax = resolved_qrange(x, sc)
    levels = qmax + 1 if symmetric else qmax - qmin + 1
    lo_ref, hi_ref = ref_kld_range(obs, rows, symmetric, levels)
    lo, hi = obs_range(obs)
    w = obs.hist.width.numpy() * (1 + 1e-6) + 1e-6 * np.maximum(np.abs(lo_ref), np.abs(hi_ref))
    assert np.all(np.abs(lo - lo_ref) <= w) and np.all(np.abs(hi - hi_ref) <= w)


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
    rows = rows_of(x, per_channel)
    qmin, qmax = resolved_qrange(x, sc)
    levels = qmax + 1 if symmetric else qmax - qmin + 1
    lo_ref, hi_ref = ref_kld_range(many, rows, symmetric, levels)
    lo, hi = obs_range(many)
    w = many.hist.width.numpy() * (1 + 1e-6) + 1e-6 * np.maximum(np.abs(lo_ref), np.abs(hi_ref))
    assert np.all(np.abs(lo - lo_ref) <= w) and np.all(np.abs(hi - hi_ref) <= w)
    lo1, hi1 = obs_range(observe("kld", x, sc, bins=512))
    amax = np.abs(rows).max(1)
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
