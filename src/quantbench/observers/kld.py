"""KL-divergence calibration (seed 001 section C.1, eq. 9), TensorRT / MXNet entropy-calibration style.

The merged histogram (``bins`` = 2048 bins) is of ``|x|`` for symmetric schemes and of ``x`` (with 0
inside the range) for asymmetric ones. Let the data occupy bins ``[a, b)`` (``a = 0`` for ``|x|``) and
let ``z0`` be the bin edge at 0. A candidate keeps ``n`` contiguous bins ``[s, e)``, ``e - s = n``,
for every ``n`` from ``L`` to ``b - a``; both ends shrink towards 0 by the same fraction
(``s = z0 - round(n * (z0 - a) / (b - a))``). ``L`` is the number of quantized levels on the kept
side: ``N_max + 1`` (``2^(t-1)`` signed, ``2^t`` unsigned) symmetric, ``2^t`` asymmetric. Then

* ``P`` = the kept bins, with the mass left of ``s`` added to bin ``s`` and the mass right of ``e``
  added to bin ``e - 1`` (the clipped outliers);
* ``Q`` = the kept bins *without* the outliers, merged into ``L`` levels (kept bin ``r`` goes to level
  ``floor(r * L / n)``); each level's mass is spread uniformly over the bins of that level where
  ``P`` is nonzero, and ``Q`` is 0 where ``P`` is;
* ``KL(P || Q) = sum_{P_j > 0} p_j log(p_j / q_j)`` over the normalised ``p``, ``q``, where a bin with
  ``p_j > 0`` but ``q_j = 0`` (an empty edge level that received outliers) uses ``q_j = KLD_EPS``.

Before the search every dominant bin (a point mass: more than ``SPIKE_RATIO`` times the count of its nearest
nonzero neighbours and at least ``SPIKE_MIN_SHARE`` of the values) takes that neighbour's count (see
:func:`suppress_spikes`), and a candidate whose kept bins hold a single nonzero bin is not a candidate (its
``P`` and ``Q`` are both that one bin, so ``KL = 0`` however much is clipped) unless the row has only one
nonzero bin. The threshold minimising the divergence (the tightest among exact ties) gives the range
``[edge_s, edge_e]`` (symmetric: ``max_abs = edge_e``), clamped inside the observed ``[min, max]``.

Candidates are evaluated in batched tensor operations: the sums over the bins of a level are differences of prefix
sums of the histogram (counts, nonzero bins, ``h log h``) gathered at the level boundaries, so the
work is a few ``(C, K, L + 1)`` gathers instead of a ``(C, K, bins)`` tensor. This is exactly the
divergence defined above (the tests compare it with a direct per-candidate numpy loop). A single row
(per-tensor) always tries every threshold ``n = L .. b - a``. When ``C`` rows would need more than
``MAX_SEARCH_CELLS`` (row, candidate, level) cells (per-channel, e.g. 64 channels x ~1900 thresholds x 129
levels), only every ``k``-th threshold ``n = L, L + k, L + 2k, ...`` is tried, with the smallest ``k``
that fits: ``k = ceil(C * K * (L + 1) / max(MAX_SEARCH_CELLS, K * (L + 1)))``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantbench.observers.base import register_observer
from quantbench.observers.histogram import CHUNK_ELEMENTS, HistogramObserver
from quantbench.observers.options import BinsOptions
from quantbench.quant.scheme import QScheme

KLD_EPS = 1e-8
# A bin holding more than this many times the count of its nearest nonzero neighbours is a spike.
SPIKE_RATIO = 4.0
# ... and at least this share of the row's values (so the noise of sparse tails is never a spike).
SPIKE_MIN_SHARE = 0.01
# At most this many (row, candidate, level) cells per search (or one row's full search): per-channel
# searches (tens of rows x ~1900 thresholds x 129 levels) then try every k-th bin as the threshold.
MAX_SEARCH_CELLS = 1 << 18


def _xlogx(t: Tensor) -> Tensor:
    return torch.special.xlogy(t, t)


def _nearest_nonzero(counts: Tensor, reverse: bool) -> Tensor:
    """Count of the nearest nonzero bin strictly left (``reverse``: right) of every bin; 0 if none."""
    if reverse:
        return _nearest_nonzero(counts.flip(1), False).flip(1)
    nb = counts.shape[1]
    j = torch.arange(nb, device=counts.device)
    last = torch.where(counts > 0, j, -1).cummax(1).values  # last nonzero bin at or before j
    prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)  # ... strictly before j
    return torch.where(prev >= 0, counts.gather(1, prev.clamp_min(0)), 0.0)


def suppress_spikes(counts: Tensor, ratio: float = SPIKE_RATIO, min_share: float = SPIKE_MIN_SHARE) -> Tensor:
    """Every dominant bin takes the larger count of its nearest nonzero neighbours.

    A bin is dominant when it holds more than ``ratio`` times that neighbour count (some other bin being
    nonzero) and at least ``min_share`` of the row's values. This generalises NVIDIA pytorch-quantization's
    ``bins[0] = bins[1]`` for the zero spike after a ReLU to a point mass anywhere: the normalised
    background of an image (every 0-pixel maps to ``-mean / std``), a padding value, a saturated activation.
    Left in, such a spike dominates ``P``, and ``Q``'s uniform spread over its level makes every threshold
    where the spike shares a level with other bins expensive, so the search picks thresholds that isolate or
    clip the spike (ResNet-20 W8A8 drops to 42 % top-1 on TensorRT placement; the digits input at W4A4 was
    clipped to +-0.02, 10 % top-1).
    """
    if counts.shape[1] < 2:
        return counts
    neigh = torch.maximum(_nearest_nonzero(counts, False), _nearest_nonzero(counts, True))
    share = counts >= min_share * counts.sum(1, keepdim=True)
    dominant = (neigh > 0) & (counts > ratio * neigh) & share
    return torch.where(dominant, neigh, counts)


def kl_divergences(hist: Tensor, a: Tensor, b: Tensor, z0: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Divergence of every candidate of every row.

    ``hist`` ``(C, B)`` float64 counts; ``a``, ``b``, ``z0`` ``(C,)`` int64 (data bins ``[a, b)``, edge
    of 0 ``z0`` with ``a <= z0 <= b``); ``levels`` = L. Returns ``(kl, s, e)``, each ``(C, K)`` with
    ``K = max(b - a) - L + 1`` candidates ``n = L + k``; invalid candidates (``n > b - a``) have
    ``kl = inf``. ``K`` may be 0.
    """
    c, nb = hist.shape
    dev = hist.device
    n_data = b - a
    k_count = int(n_data.max()) - levels + 1 if c else 0
    if k_count <= 0:
        empty = torch.zeros(c, 0, device=dev)
        return empty.to(torch.float64), empty.long(), empty.long()

    zero = torch.zeros(c, 1, dtype=torch.float64, device=dev)
    h_cum = torch.cat([zero, hist.cumsum(1)], 1)  # (C, B+1): mass of bins [0, j)
    nz_cum = torch.cat([zero, (hist > 0).to(torch.float64).cumsum(1)], 1)
    hl_cum = torch.cat([zero, _xlogx(hist).cumsum(1)], 1)
    total = h_cum[:, -1]

    per_row = k_count * (levels + 1)  # one row always gets every threshold (TensorRT's full search)
    stride = max(1, -(-c * per_row // max(MAX_SEARCH_CELLS, per_row)))
    n = torch.arange(levels, levels + k_count, stride, device=dev)  # (K,)
    k_count = n.numel()
    kl = torch.empty(c, k_count, dtype=torch.float64, device=dev)
    s_all = torch.empty(c, k_count, dtype=torch.long, device=dev)
    l_idx = torch.arange(levels + 1, device=dev)
    rows_per = max(1, CHUNK_ELEMENTS // (4 * k_count * (levels + 1)))
    for r0 in range(0, c, rows_per):
        r1 = min(c, r0 + rows_per)
        rc = r1 - r0
        hc, hcum, nzc, hlc, tot = hist[r0:r1], h_cum[r0:r1], nz_cum[r0:r1], hl_cum[r0:r1], total[r0:r1]
        a_, z_, nd = a[r0:r1, None], z0[r0:r1, None], n_data[r0:r1, None]
        valid = n[None, :] <= nd  # (rc, K)
        n_l = torch.round(n[None, :] * (z_ - a_).to(torch.float64) / nd.clamp_min(1)).long()
        s = (z_ - n_l).clamp(0, nb - 1)
        e = (s + n[None, :]).clamp(1, nb)
        s_all[r0:r1] = s

        def at(table: Tensor, idx: Tensor, rows: int = rc) -> Tensor:
            return table.gather(1, idx.reshape(rows, -1)).reshape(idx.shape)

        left = at(hcum, s)  # mass left of the kept bins
        right = tot[:, None] - at(hcum, e)  # mass right of them
        h_s, h_e = at(hc, s), at(hc, e - 1)
        same = e - 1 == s
        p_s = h_s + left + torch.where(same, right, 0.0)
        p_e = torch.where(same, h_e, h_e + right)

        # level l covers kept bins [ceil(l n / L), ceil((l + 1) n / L))
        bounds = s[..., None] + (l_idx * n[:, None] + levels - 1).div(levels, rounding_mode="floor")
        bounds = bounds.clamp(0, nb)  # (rc, K, L+1)
        raw = at(hcum, bounds).diff(dim=-1)  # (rc, K, L): raw level masses
        nonzero = at(nzc, bounds).diff(dim=-1)
        nonzero[..., 0] += (p_s > 0).to(torch.float64) - (h_s > 0).to(torch.float64)
        nonzero[..., -1] += (p_e > 0).to(torch.float64) - (h_e > 0).to(torch.float64)
        p_mass = raw.clone()
        p_mass[..., 0] += left
        p_mass[..., -1] += right

        # sum_j p_j log p_j, with p = P / total and sum P = total
        plogp = at(hlc, e) - at(hlc, s) - _xlogx(h_s) - _xlogx(h_e) + _xlogx(p_s) + _xlogx(p_e)
        t = tot[:, None]
        ent = plogp / t - torch.log(t)
        # sum_j p_j log q_j: q is constant (raw_l / nonzero_l / sum Q) over a level's nonzero P bins
        q_sum = (at(hcum, e) - left).clamp_min(0)  # = sum of raw kept mass
        q_level = torch.where(
            raw > 0, raw / nonzero.clamp_min(1) / q_sum.clamp_min(1e-300)[..., None], KLD_EPS
        )
        cross = (p_mass / t[..., None] * torch.log(q_level)).sum(-1)
        # one nonzero kept bin: P == Q whatever is clipped; allowed only if the row has one nonzero bin
        informative = (at(nzc, e) - at(nzc, s) >= 2) | (nzc[:, -1:] < 2)
        kl[r0:r1] = torch.where(valid & informative, ent - cross, torch.inf)
    e_all = (s_all + n[None, :]).clamp(max=nb)
    return kl, s_all, e_all


@register_observer("kld")
class KLDObserver(HistogramObserver):
    """Min-KL threshold on a 2048-bin histogram (TensorRT entropy); for activations. Option ``bins``.

    Seed 001 (Table 10) uses KLD for activations only, with MinMax or MSE weights. A weight row holds few
    values (144 per channel in ResNet-20's first stage): spread over 2048 bins its histogram is mostly
    empty, and a threshold whose kept bins hold a single nonzero bin has KL = 0 however much it clips;
    such thresholds are excluded (before, they clipped a 4-bit channel to 1/200 of its range), but a
    sparse histogram still makes KL a noisy criterion, so weights default to ``mse``.
    """

    Options = BinsOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, bins: int = 2048,
                 **options: Any) -> None:
        super().__init__(scheme, is_weight, bins=bins, **options)

    def levels(self) -> int:
        """L: quantized levels on the kept side of the histogram."""
        qmin, qmax = self.qrange()
        return qmax + 1 if self.scheme.symmetric else qmax - qmin + 1

    def search(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(kl, s, e)`` for every candidate (see :func:`kl_divergences`)."""
        self.check_ready()
        hist = self.hist
        counts, off, _ = hist._state()
        mn, mx = self.min_val.to(torch.float64), self.max_val.to(torch.float64)
        if hist.absolute:
            lo_d, hi_d = torch.zeros_like(mn), torch.maximum(-mn, mx)
        else:
            lo_d, hi_d = mn.clamp_max(0), mx.clamp_min(0)
        ab = hist.bin_index(torch.stack([lo_d, hi_d], 1))
        z0 = (-off).long()
        return kl_divergences(suppress_spikes(counts), ab[:, 0], ab[:, 1] + 1, z0, self.levels())

    def compute_range(self) -> tuple[Tensor, Tensor]:
        kl, s, e = self.search()
        mn, mx = self.min_val.to(torch.float64), self.max_val.to(torch.float64)
        if self.hist.absolute:
            lo, hi = -torch.maximum(-mn, mx), torch.maximum(-mn, mx)
        else:
            lo, hi = mn, mx
        if kl.shape[1]:
            best = kl.argmin(1, keepdim=True)
            found = torch.isfinite(kl.gather(1, best)).squeeze(1) & (self.hist.width > 0)
            edges = self.hist.edges()
            lo_t = edges.gather(1, s.gather(1, best)).squeeze(1)
            hi_t = edges.gather(1, e.gather(1, best)).squeeze(1)
            if self.hist.absolute:
                lo_t = -hi_t
            lo, hi = torch.where(found, lo_t, lo), torch.where(found, hi_t, hi)
        return self.clamp_to_observed(lo, hi)
