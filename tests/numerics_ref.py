"""Float64 numpy references for the quantization primitives (seed 001 section E and eq. 6-7, seed 003 eq. 2-4),
shared by the numerics tests (not a test module)."""

from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)
# x/s is computed as x * float32(1/s) (like torch's kernel), not as a correctly rounded x/s; the two
# can only round to different integers when the exact x/s lies this close (relatively) to a .5 tie.
TIE_RTOL = 1e-6


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def t32(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


def ref_qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Seed 001 section E."""
    if not signed:
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1


def ref_qparams(lo, hi, qmin: int, qmax: int, symmetric: bool, pow2: bool = False):
    """Scale / zero-point in float64 (seed 001 eq. 6 symmetric, eq. 7 asymmetric)."""
    lo = np.asarray(lo, dtype=np.float64)
    hi = np.asarray(hi, dtype=np.float64)

    def finish(s):
        s = np.maximum(s, EPS32)
        return np.exp2(np.ceil(np.log2(s))) if pow2 else s

    if symmetric:
        if qmin < 0:
            s = finish(np.maximum(np.maximum(-lo, hi), 0.0) / ((qmax - qmin) / 2.0))
        else:
            s = finish(np.maximum(hi, 0.0) / qmax)
        return s, np.zeros(s.shape, dtype=np.int64), None
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    s = finish((hi - lo) / (qmax - qmin))
    ratio = lo / s
    return s, np.clip(qmin - np.rint(ratio), qmin, qmax).astype(np.int64), ratio


def ref_fake_quant(x, s, z, qmin: int, qmax: int, axis: int | None = None):
    """(output, in-range mask, x/s) in float64: round half to even, add z, clamp, dequantize."""
    x = np.asarray(x, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    v = x / s
    q = np.rint(v) + z
    mask = (q >= qmin) & (q <= qmax)
    return (np.clip(q, qmin, qmax) - z) * s, mask, v


def near_tie(v: np.ndarray) -> np.ndarray:
    """Where the exact x/s is within TIE_RTOL (relative) of a k + 0.5 tie."""
    return np.abs(np.abs(v - np.floor(v)) - 0.5) <= TIE_RTOL * np.maximum(np.abs(v), 1.0)


def ref_binary_weights(w: np.ndarray, ternary: bool, threshold: float = 0.7) -> np.ndarray:
    """Seed 003 eq. 2-4 per output filter (axis 0) in float64."""
    w = np.asarray(w, dtype=np.float64)
    m = np.abs(w.reshape(w.shape[0], -1)).mean(axis=1).reshape(-1, *([1] * (w.ndim - 1)))
    if ternary:
        return np.sign(w) * (np.abs(w) >= threshold * m) * m
    return np.where(w >= 0, 1.0, -1.0) * m
