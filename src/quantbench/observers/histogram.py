"""Mergeable per-row histograms and the base class of the histogram-based observers.

Histogram-based calibration (quantile, MSE and KLD on activations) needs the distribution of *every*
calibration batch, not of the widest or the last one. :class:`MergeableHistogram` keeps one histogram
of ``B`` equal bins per row of the ``(C, n)`` observer view and merges batches exactly:

* the bin edges of row ``c`` are ``(offset[c] + j) * width[c]`` for ``j = 0..B`` with an integer
  ``offset``, i.e. the grid is aligned to 0 (0 is always an edge) and the clipping range of a
  quantizer, which always contains 0, is always covered;
* when a batch falls outside a row's range, the range grows by doubling the bin width: adjacent bin
  pairs ``(2k, 2k+1)`` of the absolute bin index are summed (exact, no interpolation) and the grid
  extends away from the end that already covers the data. Because ``(k * (2w)) == ((2k) * w)`` in
  floating point, every edge of the coarser grid is bit-identical to an edge of the finer one, so the
  merged counts are exactly what ``np.histogram`` gives on the final grid;
* the batch's values are then counted on the current grid with one batched ``bincount`` over the flat
  index ``row * B + bin``. Bins are half-open ``[e_j, e_{j+1})`` and the grid always keeps the data
  strictly below its top edge, so the assignment is the one of ``np.histogram(x, bins=edges)``.

``absolute=True`` histograms ``|x|`` over ``[0, hi]`` (symmetric schemes). A row that has only seen
zeros has ``width == 0`` and all its mass in bin 0 (a point mass at 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantbench.errors import ConfigError
from quantbench.observers.base import Observer, raw_outside, row_aminmax
from quantbench.quant.scheme import QScheme

# Upper bound on the elements of one temporary tensor (the batched bincount and the search loops of
# the observers are chunked to stay under it).
CHUNK_ELEMENTS = 1 << 24


def check_bins(bins: Any) -> int:
    """Validate a ``bins`` option: an even integer >= 2 (doubling pairs bins up)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2 or bins % 2:
        raise ConfigError(f"bins must be an even integer >= 2, got {bins!r}")
    return bins


class MergeableHistogram:
    """Per-row histograms of a stream of ``(C, n)`` batches on growing, 0-aligned grids.

    Attributes (``None`` until the first batch): ``counts`` ``(C, B)`` float64 (exact integers),
    ``offset`` ``(C,)`` float64 (integral) and ``width`` ``(C,)`` float64.
    """

    def __init__(self, bins: int = 2048, absolute: bool = False) -> None:
        self.bins = check_bins(bins)
        self.absolute = absolute
        self.counts: Tensor | None = None
        self.offset: Tensor | None = None
        self.width: Tensor | None = None

    # -- grid ----------------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return self.counts is None

    def _state(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.counts is None or self.offset is None or self.width is None:
            raise RuntimeError("the histogram is empty: add a batch first")
        return self.counts, self.offset, self.width

    def edges(self) -> Tensor:
        """Bin edges ``(C, B + 1)`` float64."""
        _, off, w = self._state()
        j = torch.arange(self.bins + 1, dtype=torch.float64, device=off.device)
        return (off[:, None] + j) * w[:, None]

    def centers(self) -> Tensor:
        """Bin centers ``(C, B)`` float64."""
        _, off, w = self._state()
        j = torch.arange(self.bins, dtype=torch.float64, device=off.device)
        return (off[:, None] + j + 0.5) * w[:, None]

    def total(self) -> Tensor:
        """Number of values counted per row ``(C,)`` float64."""
        return self._state()[0].sum(1)

    def _grid(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Offset and width of a fresh grid covering ``lo <= x < top`` (``lo <= 0 <= hi``)."""
        b = self.bins
        span = hi - lo
        w = torch.where(lo == 0, span / b, span / (b - 1))
        pos = w > 0
        w_safe = torch.where(pos, w, 1.0)
        for _ in range(64):  # float rounding: widen slightly until first edge <= lo and top edge > hi
            off = torch.where(pos & (lo < 0), torch.floor(lo / w_safe), 0.0)
            off = off - (pos & (off * w_safe > lo)).to(off.dtype)
            short = pos & ((off + b) * w_safe <= hi)
            if not bool(short.any()):
                break
            w_safe = torch.where(short, w_safe * (1 + 2.0**-40), w_safe)
        else:  # pragma: no cover - converges in one or two rounds
            raise RuntimeError("could not build a histogram grid covering the data")
        return torch.where(pos, off, 0.0), torch.where(pos, w_safe, 0.0)

    def _cover(self, lo: Tensor, hi: Tensor) -> None:
        """Grow every row's grid until it covers ``[lo, hi]`` (exactly regrouping the counts)."""
        counts, off, w = self._state()
        b = self.bins
        # Rows that have only seen zeros get a fresh grid; their mass (all at 0) moves to the bin
        # starting at the edge 0, i.e. bin ``-offset``.
        fresh = (w == 0) & (hi > lo)
        if bool(fresh.any()):
            new_off, new_w = self._grid(lo, hi)
            zero_bin = (-new_off).clamp(0, b - 1).long()
            moved = torch.zeros_like(counts).scatter_(1, zero_bin[:, None], counts.sum(1, keepdim=True))
            counts = torch.where(fresh[:, None], moved, counts)
            off = torch.where(fresh, new_off, off)
            w = torch.where(fresh, new_w, w)
        j = torch.arange(b, dtype=torch.float64, device=counts.device)
        identity = j.long().expand_as(counts)
        for _ in range(4096):  # each round doubles the width; float64 has ~2100 binades
            need_down = (w > 0) & (lo < off * w)
            need_up = (w > 0) & (hi >= (off + b) * w)
            need = need_down | need_up
            if not bool(need.any()):
                break
            # Extending downwards keeps the old range at the top of the new one, otherwise at the
            # bottom; old absolute bin a = off + j goes to new absolute bin floor(a / 2).
            new_off = torch.where(need_down, torch.ceil((off + b) / 2) - b, torch.floor(off / 2))
            new_bin = (torch.floor((off[:, None] + j) / 2) - new_off[:, None]).long()
            index = torch.where(need[:, None], new_bin, identity)
            counts = torch.zeros_like(counts).scatter_add_(1, index, counts)
            off = torch.where(need, new_off, off)
            w = torch.where(need, 2 * w, w)
        else:  # pragma: no cover
            raise RuntimeError("histogram range growth did not converge")
        self.counts, self.offset, self.width = counts, off, w

    # -- counting ------------------------------------------------------------------------------
    def bin_index(self, values: Tensor) -> Tensor:
        """Bin of each value (``(C, k)`` float64, inside the grid) as in ``np.histogram``: ``[e_j, e_j+1)``."""
        _, off, w = self._state()
        b = self.bins
        off, w = off[:, None], w[:, None]
        pos = w > 0
        inv = torch.where(pos, 1.0 / torch.where(pos, w, 1.0), 0.0)
        idx = torch.floor(values * inv).sub_(off).clamp_(0, b - 1)  # off by at most one: fix below
        idx -= (values < (idx + off).mul_(w)).to(idx.dtype)
        idx += ((values >= (idx + off).add_(1).mul_(w)) & (idx < b - 1) & pos).to(idx.dtype)
        return idx.clamp_(0, b - 1).long()  # rows of width 0 (only zeros) have inv = 0: bin 0

    @torch.no_grad()
    def add(self, rows: Tensor, row_min: Tensor | None = None, row_max: Tensor | None = None) -> None:
        """Merge one batch ``(C, n)``; ``row_min`` / ``row_max`` (of ``rows``, not ``|rows|``) are
        recomputed when not given."""
        if rows.dim() != 2:
            raise ValueError(f"expected a (C, n) tensor, got shape {tuple(rows.shape)}")
        if rows.numel() == 0:
            return
        if row_min is None or row_max is None:
            row_min, row_max = row_aminmax(rows)
        mn, mx = row_min.detach().to(torch.float64), row_max.detach().to(torch.float64)
        if self.absolute:
            lo, hi = torch.zeros_like(mn), torch.maximum(-mn, mx)
        else:
            lo, hi = mn.clamp_max(0), mx.clamp_min(0)
        if self.counts is None:
            c = rows.shape[0]
            self.counts = torch.zeros(c, self.bins, dtype=torch.float64, device=rows.device)
            self.offset, self.width = self._grid(lo, hi)
        else:
            if rows.shape[0] != self.counts.shape[0]:
                raise ValueError(
                    f"batch has {rows.shape[0]} rows but the histogram has {self.counts.shape[0]}: "
                    "the channel count changed between calibration batches"
                )
            self._cover(lo, hi)
        self.counts = self.counts + self._count(rows)

    def _count(self, rows: Tensor) -> Tensor:
        """Counts of one batch on the current grid: one float32 pass and a batched ``bincount``.

        The bin of ``x`` is ``floor(x / w) - offset`` computed in float32; a value within float32
        rounding of a bin edge may land in the neighbouring bin (``bin_index`` is the exact rule).
        """
        c, n = rows.shape
        b = self.bins
        _, off, w = self._state()
        pos = w > 0
        inv64 = torch.where(pos, 1.0 / torch.where(pos, w, 1.0), 0.0)
        dtype = torch.float32 if bool((inv64 < 1e30).all()) else torch.float64
        inv = inv64.to(dtype)[:, None]
        off_t = off.to(dtype)[:, None]
        neg_off = -off_t
        itype = torch.int32 if c * b < 2**31 else torch.int64
        base = torch.arange(c, device=rows.device, dtype=itype)[:, None] * b
        flat = torch.zeros(c * b, dtype=torch.float64, device=rows.device)
        step = max(1, CHUNK_ELEMENTS // (4 * c))
        for start in range(0, n, step):
            x = rows[:, start : start + step].to(dtype)
            if self.absolute:  # |x| histograms start at 0 (offset 0)
                t = torch.mul(x, inv).abs_().clamp_(max=b - 1)
            else:
                t = torch.addcmul(neg_off, x, inv).clamp_(0, b - 1)
            idx = t.to(itype)  # t >= 0: truncation is floor
            if c > 1:
                idx += base
            flat += torch.bincount(idx.reshape(-1), minlength=c * b).to(torch.float64)
        return flat.reshape(c, b)

    # -- statistics ----------------------------------------------------------------------------
    def quantile(self, q: float) -> Tensor:
        """Per-row ``q``-quantile ``(C,)`` float64 with linear interpolation between order statistics
        (``np.quantile``'s default); each order statistic is placed uniformly inside its bin, so the
        error is below one bin width."""
        counts, off, w = self._state()
        b = self.bins
        total = counts.sum(1)
        r = q * (total - 1)
        k0 = torch.floor(r)
        k1 = torch.minimum(k0 + 1, total - 1)
        frac = (r - k0)[:, None]
        ks = torch.stack([k0, k1], dim=1)
        cum = counts.cumsum(1)
        bin_ = torch.searchsorted(cum, ks, right=True).clamp(max=b - 1)  # first bin with cum > k
        cnt = counts.gather(1, bin_)
        before = cum.gather(1, bin_) - cnt
        inside = ((ks - before + 0.5) / cnt.clamp_min(1)).clamp(0, 1)
        val = (off[:, None] + bin_ + inside) * w[:, None]
        return (val[:, :1] + frac * (val[:, 1:] - val[:, :1])).squeeze(1)


def histogram_outside(hist: MergeableHistogram, lo: Tensor, hi: Tensor) -> Tensor:
    """Share ``(C,)`` float64 of each row's counts in bins entirely outside ``[lo, hi]`` (for ``|x|``
    histograms: entirely above ``max(-lo, hi)``)."""
    counts = hist.counts
    assert counts is not None
    edges = hist.edges()
    lo = lo.to(torch.float64)[:, None]
    hi = hi.to(torch.float64)[:, None]
    above = edges[:, :-1] >= (torch.maximum(-lo, hi) if hist.absolute else hi)
    out = above if hist.absolute else above | (edges[:, 1:] <= lo)
    return (counts * out).sum(1) / counts.sum(1).clamp_min(1)


class HistogramObserver(Observer):
    """Base of the observers that calibrate activations from a :class:`MergeableHistogram`.

    ``absolute_histogram(scheme)`` says whether the histogram is of ``|x|`` (default: for symmetric
    schemes). Subclasses that compute weights exactly set ``exact_weights = True``: a weight observer
    (``is_weight=True``) then keeps its (single) raw tensor instead of a histogram; when it is
    observed again (e.g. once per calibration batch) the latest tensor replaces the previous one.
    """

    exact_weights: bool = False
    tracks_values = False

    def __init__(self, scheme: QScheme, is_weight: bool = False, bins: int = 2048,
                 **options: Any) -> None:
        super().__init__(scheme, is_weight, **options)
        self.bins = check_bins(bins)
        self.hist = MergeableHistogram(self.bins, absolute=self.absolute_histogram(scheme))
        self.raw: Tensor | None = None

    @classmethod
    def absolute_histogram(cls, scheme: QScheme) -> bool:
        return scheme.symmetric

    @property
    def uses_raw(self) -> bool:
        return self.is_weight and self.exact_weights

    def _accumulate(self, rows: Tensor, batch_min: Tensor, batch_max: Tensor) -> None:
        if self.uses_raw:
            self.raw = rows.clone()
        else:
            self.hist.add(rows, batch_min, batch_max)

    def clipped_fraction(self, lo: Tensor, hi: Tensor) -> Tensor:
        if self.uses_raw:
            assert self.raw is not None
            return raw_outside(self.raw, lo, hi)
        if self.hist.empty:
            return super().clipped_fraction(lo, hi)
        return histogram_outside(self.hist, lo, hi)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}"
