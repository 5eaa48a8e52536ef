"""MQBench's EMA-MSE, EMA-quantile and ClipStd calibrators against float64 numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantbench.errors import ConfigError
from quantbench.observers import build_observer
from quantbench.quant.scheme import QScheme

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scheme(bits: int, symmetric: bool, per_channel: bool) -> QScheme:
    return QScheme(bits=bits, symmetric=symmetric, granularity="per_channel" if per_channel else "per_tensor",
                   ch_axis=1)


def batches(seed: int, n: int = 3) -> list[np.ndarray]:
    """Batches (8, 3, 5, 5) with drifting statistics, so the EMA differs from any single batch."""
    r = np.random.default_rng(seed)
    return [(r.normal(0.2 * i, 1.0 + 0.5 * i, (8, 3, 5, 5))).astype(np.float32) for i in range(n)]


def rows(x: np.ndarray, per_channel: bool) -> np.ndarray:
    x = x.astype(np.float64)
    return np.moveaxis(x, 1, 0).reshape(x.shape[1], -1) if per_channel else x.reshape(1, -1)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def ref_qparams(lo, hi, qmin, qmax, symmetric):
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    if symmetric:
        div = (qmax - qmin) / 2.0 if qmin < 0 else qmax
        s = np.maximum(np.maximum(np.maximum(-lo, hi), 0.0) / div, EPS32) if qmin < 0 else \
            np.maximum(np.maximum(hi, 0.0) / div, EPS32)
        return s, np.zeros_like(s)
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    s = np.maximum((hi - lo) / (qmax - qmin), EPS32)
    return s, np.clip(qmin - np.rint(lo / s), qmin, qmax)


def ref_mse_range(r: np.ndarray, bits: int, symmetric: bool, k: int = 100):
    """Per row: the candidate (fractions k'/K of the range, as ``mse``) with the least float64 squared error."""
    qmin, qmax = qrange(bits, r.min() < 0)
    frac = (np.arange(1, k + 1, dtype=np.float64) / k).astype(np.float32)
    los, his = [], []
    for row in r:
        if symmetric:
            amax = np.float32(max(-row.min(), row.max(), 0.0))
            hi_c = amax * frac
            lo_c = -hi_c
        else:
            lo_c, hi_c = np.float32(row.min()) * frac, np.float32(row.max()) * frac
        s, z = ref_qparams(lo_c, hi_c, qmin, qmax, symmetric)
        xq = (np.clip(np.rint(row[None, :] / s[:, None]) + z[:, None], qmin, qmax) - z[:, None]) * s[:, None]
        best = int(np.argmin(((xq - row[None, :]) ** 2).sum(1)))
        los.append(lo_c[best])
        his.append(hi_c[best])
    return np.array(los, np.float64), np.array(his, np.float64)


def ref_quantile_range(r: np.ndarray, symmetric: bool, alpha: float):
    if symmetric:
        amax = np.quantile(np.abs(r), alpha, axis=1)
        lo, hi = -amax, amax
    else:
        lo, hi = np.quantile(r, 1 - alpha, axis=1), np.quantile(r, alpha, axis=1)
    return np.clip(lo, r.min(1), r.max(1)), np.clip(hi, r.min(1), r.max(1))


def ema(ranges: list[tuple[np.ndarray, np.ndarray]], m: float = 0.9):
    lo, hi = ranges[0]
    for blo, bhi in ranges[1:]:
        lo, hi = m * lo + (1 - m) * blo, m * hi + (1 - m) * bhi
    return lo, hi


def run(name: str, data: list[np.ndarray], sc: QScheme, is_weight: bool = False, **opts):
    obs = build_observer(name, sc, is_weight=is_weight, **opts)
    for b in data:
        obs.observe(torch.from_numpy(b))
    lo, hi = obs.compute_range()
    return obs, lo.numpy().astype(np.float64), hi.numpy().astype(np.float64)


CASES = [(pc, sym, bits) for pc in (False, True) for sym in (True, False) for bits in (2, 4, 8)]


@pytest.mark.parametrize(("per_channel", "symmetric", "bits"), CASES)
def test_ema_mse_exact_path_is_the_ema_of_per_batch_mse_ranges(per_channel, symmetric, bits):
    data = batches(bits)
    # is_weight: each batch's search runs on its raw values (exact); a weight that changes between
    # observations (QAT re-calibration) is the same code path
    _, lo, hi = run("ema_mse", data, scheme(bits, symmetric, per_channel), is_weight=True)
    ref_lo, ref_hi = ema([ref_mse_range(rows(b, per_channel), bits, symmetric) for b in data])
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hi, ref_hi, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("per_channel", "symmetric", "bits"), CASES)
def test_ema_mse_activations_follow_the_per_batch_search(per_channel, symmetric, bits):
    data = batches(bits + 20)
    _, lo, hi = run("ema_mse", data, scheme(bits, symmetric, per_channel))
    ref_lo, ref_hi = ema([ref_mse_range(rows(b, per_channel), bits, symmetric) for b in data])
    # histogram path: the per-batch choice may move by a candidate step or two (1 % of the range each)
    tol = 0.03 * max(np.abs(rows(b, per_channel)).max() for b in data)
    assert np.all(np.abs(lo - ref_lo) <= tol) and np.all(np.abs(hi - ref_hi) <= tol), (lo, ref_lo, hi, ref_hi)


@pytest.mark.parametrize(("per_channel", "symmetric"), [(False, True), (False, False), (True, True), (True, False)])
@pytest.mark.parametrize("is_weight", [True, False])
def test_ema_quantile_is_the_ema_of_per_batch_quantiles(per_channel, symmetric, is_weight):
    data = batches(7)
    _, lo, hi = run("ema_quantile", data, scheme(8, symmetric, per_channel), is_weight=is_weight, alpha=0.99)
    ref_lo, ref_hi = ema([ref_quantile_range(rows(b, per_channel), symmetric, 0.99) for b in data])
    # exact for weights; activations: each batch's quantile within one of its 2048 histogram bins
    tol = 1e-5 if is_weight else 2 * max(np.abs(b).max() for b in data) / 2048
    np.testing.assert_allclose(lo, ref_lo, rtol=0, atol=tol)
    np.testing.assert_allclose(hi, ref_hi, rtol=0, atol=tol)


def test_ema_momentum_option():
    data = batches(3)
    sc = scheme(8, True, False)
    _, _, hi0 = run("ema_quantile", data, sc, is_weight=True, momentum=0.0, alpha=0.99)  # the last batch
    ref = ref_quantile_range(rows(data[-1], False), True, 0.99)[1]
    np.testing.assert_allclose(hi0, ref, rtol=1e-5)
    _, _, hi5 = run("ema_quantile", data, sc, is_weight=True, momentum=0.5, alpha=0.99)
    ref5 = ema([ref_quantile_range(rows(b, False), True, 0.99) for b in data], 0.5)[1]
    np.testing.assert_allclose(hi5, ref5, rtol=1e-5)


@pytest.mark.parametrize(("per_channel", "symmetric"), [(False, True), (False, False), (True, True), (True, False)])
def test_clipstd_is_the_union_of_observed_range_and_k_sigma(per_channel, symmetric):
    r = np.random.default_rng(9)
    data = [r.uniform(-1, 2, (8, 3, 5, 5)).astype(np.float32) for _ in range(3)]  # narrower than 2.6 sigma
    data[1][0, 0, 0, 0] = 9.0  # an outlier: wider than 2.6 sigma
    _, lo, hi = run("clipstd", data, scheme(8, symmetric, per_channel))
    x = np.concatenate([rows(b, per_channel) for b in data], axis=1)
    mu, sd = x.mean(1), x.std(1, ddof=1)
    ref_lo, ref_hi = np.minimum(mu - 2.6 * sd, x.min(1)), np.maximum(mu + 2.6 * sd, x.max(1))
    if symmetric:
        amax = np.maximum(np.abs(ref_lo), np.abs(ref_hi))
        ref_lo, ref_hi = -amax, amax
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-5)
    np.testing.assert_allclose(hi, ref_hi, rtol=1e-5)
    _, lo2, hi2 = run("clipstd", data, scheme(8, symmetric, per_channel), std_scale=5.0)
    assert np.all(hi2 >= hi) and np.all(lo2 <= lo)


@pytest.mark.fault(input="an out-of-range option of ema_mse / ema_quantile / clipstd (momentum 1, alpha 0.2, "
                         "std_scale -1, bins 7)", exit_code=2,
                   message="ema_mse momentum must be in [0, 1), got 1.0", kept="nothing runs")
@pytest.mark.parametrize(("name", "options"), [
    ("ema_mse", {"momentum": 1.0}), ("ema_quantile", {"momentum": -0.1}), ("ema_quantile", {"alpha": 0.2}),
    ("ema_mse", {"num_candidates": 0}), ("ema_quantile", {"bins": 7}), ("clipstd", {"std_scale": -1.0}),
])
def test_invalid_options_raise_config_error(name, options):
    with pytest.raises(ConfigError):
        build_observer(name, scheme(8, True, False), **options)


@pytest.mark.parametrize("name", ["ema_mse", "ema_quantile", "clipstd"])
def test_unknown_option_is_refused_naming_the_observer(name):
    with pytest.raises(TypeError, match=f"observer .{name}.: unknown option bogus=1"):
        build_observer(name, scheme(8, True, False), bogus=1)
