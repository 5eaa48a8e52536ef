"""MSE calibration (seed 001 section C.1, eq. 8): the clipping range minimising ``||x - x_hat||^2``.

Candidates (``K = num_candidates``, ``k = 1..K``), per row:

* symmetric: ``[-t_k, t_k]`` with ``t_k = max|x| * k / K``;
* asymmetric: ``[min * k / K, max * k / K]`` (both ends shrink by the same factor, as in MQBench).

Each candidate is evaluated through exactly what the quantizer will do: ``qparams_from_range`` with
the resolved integer range (adaptive signedness, narrow range) and the scheme's scale type, then the
fake-quantization arithmetic of :mod:`quantbench.quant.fake_quant`. All candidates are evaluated in
batched tensor operations. Weights (one tensor) use the raw values; activations use the bin centers
of the merged histogram of every calibration batch, weighted by the bin counts.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quantbench.errors import ConfigError
from quantbench.observers.base import register_observer
from quantbench.observers.histogram import HistogramObserver
from quantbench.observers.options import MSEOptions
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.scheme import QScheme

# Largest (rows x candidates x values) tensor one evaluation step builds.
MSE_CHUNK_ELEMENTS = 1 << 25


def fake_quant_values(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``dequantize(quantize(x))`` with already-broadcastable parameters; the same arithmetic as
    :func:`quantbench.quant.fake_quant.fake_quantize` (``x * (1/s)``, round half to even)."""
    s = scale.to(x.dtype)
    z = zero_point.to(x.dtype)
    q = x * torch.reciprocal(s)  # a fresh tensor: the rest is done in place to save memory
    return q.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def candidate_errors(values: Tensor, weights: Tensor | None, scale: Tensor, zero_point: Tensor,
                     qmin: int, qmax: int) -> Tensor:
    """Squared quantization error ``(C, K)`` float64 of ``values`` ``(C, n)`` (optionally weighted per
    value by ``weights`` ``(C, n)``) under each of the ``K`` candidate quantizers ``(C, K)``."""
    c, n = values.shape
    k = scale.shape[1]
    out = torch.empty(c, k, dtype=torch.float64, device=values.device)
    n = max(n, 1)
    rows_per = max(1, min(c, MSE_CHUNK_ELEMENTS // n))
    for r0 in range(0, c, rows_per):
        x = values[r0 : r0 + rows_per, None, :]
        wt = None if weights is None else weights[r0 : r0 + rows_per, None, :]
        cands_per = max(1, MSE_CHUNK_ELEMENTS // (x.shape[0] * n))
        for k0 in range(0, k, cands_per):
            s = scale[r0 : r0 + rows_per, k0 : k0 + cands_per, None]
            z = zero_point[r0 : r0 + rows_per, k0 : k0 + cands_per, None]
            err = fake_quant_values(x, s, z, qmin, qmax).sub_(x).square_()
            out[r0 : r0 + rows_per, k0 : k0 + cands_per] = (
                err.sum(-1, dtype=torch.float64) if wt is None else (err.to(torch.float64) * wt).sum(-1)
            )
    return out


@register_observer("mse")
class MSEObserver(HistogramObserver):
    """Options: ``num_candidates`` (K, default 100); ``bins`` (activation histogram bins, 2048)."""

    exact_weights = True
    Options = MSEOptions

    def __init__(self, scheme: QScheme, is_weight: bool = False, num_candidates: int = 100,
                 bins: int = 2048, **options: Any) -> None:
        super().__init__(scheme, is_weight, bins=bins, **options)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ConfigError(f"mse num_candidates must be a positive integer, got {num_candidates!r}")
        self.num_candidates = num_candidates

    @classmethod
    def absolute_histogram(cls, scheme: QScheme) -> bool:
        return False  # the signed histogram: signed ranges are not symmetric (-2^(t-1) .. 2^(t-1)-1)

    def candidate_ranges(self) -> tuple[Tensor, Tensor]:
        """Candidate clipping ranges ``(lo, hi)``, each ``(C, K)`` float32."""
        self.check_ready()
        k = self.num_candidates
        frac = (torch.arange(1, k + 1, dtype=torch.float64, device=self.min_val.device) / k).to(
            torch.float32
        )
        if self.scheme.symmetric:
            amax = torch.maximum(-self.min_val, self.max_val).clamp_min(0)
            hi = amax[:, None] * frac
            return -hi, hi
        return self.min_val[:, None] * frac, self.max_val[:, None] * frac

    def candidate_errors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(lo, hi, err)``: the candidate ranges and their squared errors, each ``(C, K)``."""
        qmin, qmax = self.qrange()
        lo, hi = self.candidate_ranges()
        scale, zp = qparams_from_range(
            lo, hi, qmin, qmax, self.scheme.symmetric, self.scheme.scale_type == "pow2"
        )
        if self.uses_raw:
            assert self.raw is not None
            err = candidate_errors(self.raw, None, scale, zp, qmin, qmax)
        else:
            counts = self.hist.counts
            assert counts is not None
            centers = self.hist.centers().to(torch.float32)
            err = candidate_errors(centers, counts, scale, zp, qmin, qmax)
        return lo, hi, err

    def compute_range(self) -> tuple[Tensor, Tensor]:
        lo, hi, err = self.candidate_errors()
        best = err.argmin(dim=1, keepdim=True)  # first minimum: the tightest range among ties
        return lo.gather(1, best).squeeze(1), hi.gather(1, best).squeeze(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_candidates={self.num_candidates}"
