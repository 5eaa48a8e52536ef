"""Data, float64 numpy references and the case grids of the observer tests (not a test module); the references
are described in test_observers.py."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from quantbench.observers import build_observer
from quantbench.observers.kld import KLD_EPS
from quantbench.quant.scheme import QScheme

EPS32 = float(np.finfo(np.float32).eps)
NEW_OBSERVERS = ["quantile", "mse", "kld", "norm", "meanstd"]
KINDS = ["normal", "uniform", "relu", "equal", "zero", "outlier", "negative"]
BITS = [2, 4, 8]
SHAPE = (2, 3, 40, 25)  # per-channel along axis 1: C = 3 rows of 2000 values
CH_AXIS = 1


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


def assert_hist_matches_np(counts: np.ndarray, data: np.ndarray, edges: np.ndarray) -> None:
    """``counts`` equals ``np.histogram(data, edges)`` except that a value within float32 rounding of an
    edge may be counted in the neighbouring bin (the counting pass runs in float32)."""
    expected, _ = np.histogram(data, bins=edges)
    assert counts.sum() == expected.sum() == data.size
    width = edges[1] - edges[0]
    pos = data / width
    near_edge = int(np.sum(np.abs(pos - np.rint(pos)) <= 1e-5 * np.maximum(1.0, np.abs(pos))))
    assert np.abs(counts - expected).sum() <= 2 * near_edge, (counts - expected).nonzero()


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
