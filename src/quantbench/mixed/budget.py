"""What a mixed-precision allocation is measured against: size-weighted average bit-widths, the largest feature
map, the hinge penalty of seed 004 App. A, and the analytic max-feature-map allocation (Obs. 6).

The average weight bit-width weights each layer by its parameter count (so ``avg * params / 8`` is the packed
weight size, the numerator of C_size, seed 003 eq. 6); the average activation bit-width weights each activation
quantizer by its elements per image. Only the quantizers *in the budget* count (the first and last layer's
weights and inputs stay at 8 bits and out of the averages with ``first_last: out``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from quantbench.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """The constraints of one allocation and the sizes they weigh (names in the model's order)."""

    w_names: tuple[str, ...]
    w_sizes: tuple[int, ...]  # parameters per weight quantizer in the budget
    a_names: tuple[str, ...]
    a_sizes: tuple[int, ...]  # elements per image per activation quantizer in the budget
    w_avg: float | None = None
    a_avg: float | None = None
    a_max_fmap_bytes: float | None = None
    lam_w: float = 2.0
    lam_a: float = 2.0

    # ------------------------------------------------------------------ measures
    @staticmethod
    def weighted(bits: Tensor | Sequence[float], sizes: Sequence[int]) -> Tensor:
        b = torch.as_tensor(bits, dtype=torch.float64) if not isinstance(bits, Tensor) else bits
        n = torch.tensor(sizes, dtype=b.dtype, device=b.device)
        return (b * n).sum() / n.sum()

    def max_fmap_bits(self, a_bits: Tensor | Sequence[float]) -> Tensor:
        """The largest activation quantizer's size in bits (one image)."""
        b = torch.as_tensor(a_bits, dtype=torch.float64) if not isinstance(a_bits, Tensor) else a_bits
        return (b * torch.tensor(self.a_sizes, dtype=b.dtype, device=b.device)).max()

    def penalty(self, w_bits: Tensor | None, a_bits: Tensor | None) -> Tensor:
        """``lam_w max(avg_w - target, 0) + lam_a max(avg_a - target, 0)``; with a feature-map budget M (bytes)
        the activation term is ``max((max_l b_l e_l - 8 M) / max_l e_l, 0)`` (in bits, like the averages)."""
        terms = []
        if w_bits is not None and self.w_avg is not None:
            terms.append(self.lam_w * torch.relu(self.weighted(w_bits, self.w_sizes) - self.w_avg))
        if a_bits is not None and self.a_avg is not None:
            terms.append(self.lam_a * torch.relu(self.weighted(a_bits, self.a_sizes) - self.a_avg))
        if a_bits is not None and self.a_max_fmap_bytes is not None:
            over = (self.max_fmap_bits(a_bits) - 8 * self.a_max_fmap_bytes) / max(self.a_sizes)
            terms.append(self.lam_a * torch.relu(over))
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def weights_over(self, w_bits: Mapping[str, int]) -> bool:
        """Whether integer weight bit-widths exceed the average weight budget (recomputed in float64)."""
        return self.w_avg is not None and bool(self.w_names) and float(
            self.weighted([w_bits[n] for n in self.w_names], self.w_sizes)) > self.w_avg + 1e-9

    def satisfied(self, w_bits: Mapping[str, int], a_bits: Mapping[str, int]) -> bool:
        """Whether integer bit-widths meet every constraint (recomputed in float64)."""
        ok = not self.weights_over(w_bits)
        if self.a_names:
            a = [a_bits[n] for n in self.a_names]
            if self.a_avg is not None:
                ok &= float(self.weighted(a, self.a_sizes)) <= self.a_avg + 1e-9
            if self.a_max_fmap_bytes is not None:
                ok &= float(self.max_fmap_bits(a)) <= 8 * self.a_max_fmap_bytes + 1e-9
        return bool(ok)

    def averages(self, w_bits: Mapping[str, int], a_bits: Mapping[str, int]) -> dict[str, float | None]:
        out: dict[str, float | None] = {"avg_weight_bits": None, "avg_activation_bits": None,
                                        "max_fmap_bytes": None}
        if self.w_names:
            out["avg_weight_bits"] = float(self.weighted([w_bits[n] for n in self.w_names], self.w_sizes))
        if self.a_names:
            a = [a_bits[n] for n in self.a_names]
            out["avg_activation_bits"] = float(self.weighted(a, self.a_sizes))
            out["max_fmap_bytes"] = float(self.max_fmap_bits(a)) / 8
        return out


def analytic_max_fmap(sizes: Mapping[str, int], budget_bytes: float, allowed: Sequence[int],
                      fixed: Mapping[str, int] | None = None) -> tuple[dict[str, int], list[str]]:
    """Seed 004 Obs. 6: every activation at ``min(floor(8 M / elements), 32)`` bits, here the largest allowed
    bit-width not above that (the backend's maximum caps it: the names capped are returned too). ``fixed``
    quantizers (the last layer's input, kept at 8 bits) are not changed but must fit. A budget below the
    smallest allowed bit-width on some feature map is a ConfigError naming the smallest feasible budget."""
    allowed = sorted(allowed)
    fixed = dict(fixed or {})
    out: dict[str, int] = {}
    capped: list[str] = []
    for name, e in sizes.items():
        if name in fixed:
            b = fixed[name]
            if b * e > 8 * budget_bytes:
                raise ConfigError(f"--a-max-fmap {budget_bytes:g} bytes: {name} ({e} elements) is kept at {b} bits "
                                  f"and needs {b * e / 8:g} bytes")
            out[name] = b
            continue
        cap = min(math.floor(8 * budget_bytes / e), 32)
        fit = [b for b in allowed if b <= cap]
        if not fit:
            need = max(allowed[0] * s for s in sizes.values()) / 8
            raise ConfigError(f"--a-max-fmap {budget_bytes:g} bytes is below {allowed[0]} bits on {name} ({e} "
                              f"elements per image): the smallest feasible budget is {need:g} bytes")
        out[name] = fit[-1]
        if cap > allowed[-1]:
            capped.append(name)
    return out, capped
