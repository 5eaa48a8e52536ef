"""The baselines a learned allocation has to beat: uniform precision at the budget, and a Hessian-free sensitivity
greedy (each quantizer's loss increase when it alone drops to a lower bit-width, then bits removed where they cost
the least loss per bit of size saved until the budget holds)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantbench.mixed.allocation import Allocation
from quantbench.mixed.budget import Budget
from quantbench.mixed.search import Searchable
from quantbench.utils.progress import track


def uniform(s: Searchable, budget: Budget, allowed: list[int]) -> Allocation:
    """Every allocated quantizer at the largest allowed bit-width not above its average target (the max
    feature-map budget: the largest uniform bit-width that fits)."""

    def at_most(t: float | None) -> int:
        return max([b for b in allowed if b <= t + 1e-9] or [allowed[0]]) if t is not None else allowed[-1]

    a_target: float | None = budget.a_avg
    if budget.a_max_fmap_bytes is not None and budget.a_sizes:
        a_target = 8 * budget.a_max_fmap_bytes / max(budget.a_sizes)
    wb, ab = at_most(budget.w_avg), at_most(a_target)
    return Allocation({n: wb for n in s.w_rules}, {n: ab for n in s.a_rules})


@torch.no_grad()
def _loss(s: Searchable, images: Tensor, labels: Tensor, device: str, batch: int = 256) -> float:
    total = 0.0
    for i in range(0, images.shape[0], batch):
        x, y = images[i:i + batch].to(device), labels[i:i + batch].to(device)
        total += float(F.cross_entropy(s.gm(x), y, reduction="sum"))
    return total / images.shape[0]


def sensitivity_greedy(s: Searchable, budget: Budget, images: Tensor, labels: Tensor, allowed: list[int],
                       device: str = "cpu", progress: bool = True) -> tuple[Allocation, dict[str, dict[int, float]]]:
    """The greedy allocation and the sensitivities ``{quantizer: {bits: loss increase}}`` it used. ``s`` should be
    freshly calibrated (not the learned search's model, whose activation ranges were trained)."""
    s.gm.eval()
    top = allowed[-1]
    s.set(Allocation({n: top for n in s.w_rules}, {n: top for n in s.a_rules}))
    base = _loss(s, images, labels, device)
    names = [("w", n) for n in s.w_rules] + [("a", n) for n in s.a_rules]
    sens: dict[str, dict[int, float]] = {}
    for kind, n in track(names, "layer sensitivities", len(names), progress):
        rule = s.w_rules[n] if kind == "w" else s.a_rules[n]
        sens[n] = {top: 0.0}
        for b in allowed[:-1]:
            rule.set_bits(b)
            sens[n][b] = _loss(s, images, labels, device) - base
        rule.set_bits(top)
    start = s.allocation()
    w, a = dict(start.weights), dict(start.activations)
    w_size = {k: n for k, n in zip(budget.w_names, budget.w_sizes, strict=True) if k in s.w_rules}
    a_size = {k: n for k, n in zip(budget.a_names, budget.a_sizes, strict=True) if k in s.a_rules}
    fmap = 8 * budget.a_max_fmap_bytes if budget.a_max_fmap_bytes is not None else None

    def step(bits: dict[str, int], sizes: dict[str, int], over: float | None = None) -> bool:
        """Lower the quantizer whose next step costs the least loss per bit of size saved (with a feature-map
        budget, only maps above it)."""
        best: tuple[float, str, int] | None = None
        for k, size in sizes.items():
            lower = [b for b in allowed if b < bits[k]]
            if not lower or (over is not None and bits[k] * size <= over):
                continue
            nb = lower[-1]
            cost = (sens[k][nb] - sens[k][bits[k]]) / ((bits[k] - nb) * size)
            if best is None or cost < best[0]:
                best = (cost, k, nb)
        if best is None:
            return False
        bits[best[1]] = best[2]
        return True

    while budget.weights_over(w) and step(w, w_size):
        pass
    while not budget.satisfied(w, a) and not budget.weights_over(w) and step(a, a_size, fmap):
        pass
    return Allocation(w, a), sens
