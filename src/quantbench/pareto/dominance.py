"""Seed 003 Def. 4.1: precision A dominates precision B if, at every model size in the overlap of their size
ranges, the network quantized at A (made wider or narrower to reach that size) is more accurate than at B.

Measured fronts are points ``(C_size, top-1)``, one per width. *Interpretation* (the paper compares curves): each
front's accuracy between its points is interpolated linearly in ``log C_size`` (the axis the paper plots), and
the two fronts are compared at every measured size of either front inside the overlap.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

Point = tuple[float, float]  # (C_size, top-1)


def _front(points: Sequence[Point]) -> list[Point]:
    pts = sorted((float(s), float(a)) for s, a in points)
    if not pts or any(s <= 0 for s, _ in pts):
        raise ValueError("a front needs at least one point, every size > 0")
    return pts


def front_accuracy(points: Sequence[Point], size: float) -> float:
    """The front's top-1 at ``size`` (inside its range), linear in log size between measured points."""
    pts = _front(points)
    if not pts[0][0] <= size <= pts[-1][0]:
        raise ValueError(f"size {size:g} is outside the front's range [{pts[0][0]:g}, {pts[-1][0]:g}]")
    for (s0, a0), (s1, a1) in itertools.pairwise(pts):
        if s0 <= size <= s1:
            if s1 == s0:
                return max(a0, a1)
            t = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return a0 + t * (a1 - a0)
    return pts[0][1]  # a one-point front


@dataclass(frozen=True)
class Verdict:
    """Def. 4.1 between fronts ``a`` and ``b``: ``winner`` is ``"a"``, ``"b"`` or None (they cross, or their size
    ranges do not overlap); ``margins`` are ``acc_a - acc_b`` at the compared sizes."""

    a: str
    b: str
    winner: str | None
    overlap: tuple[float, float] | None
    sizes: tuple[float, ...]
    margins: tuple[float, ...]

    def sentence(self) -> str:
        """The verdict as the report writes it under the plot."""
        if self.overlap is None:
            return f"{self.a} and {self.b} cannot be compared: their size ranges do not overlap."
        lo, hi = self.overlap
        where = f"between C_size {lo:.4g} and {hi:.4g} bits"
        if self.winner is not None:
            win, lose = (self.a, self.b) if self.winner == "a" else (self.b, self.a)
            m = min(abs(x) for x in self.margins)
            return (f"{win} dominates {lose} (seed 003 Def. 4.1): more accurate at every size {where}, "
                    f"by at least {m:.2f} points.")
        cross = next((s for s, m0, m1 in zip(self.sizes[1:], self.margins, self.margins[1:], strict=False)
                      if (m0 > 0) != (m1 > 0)), self.sizes[0])
        return (f"Neither {self.a} nor {self.b} dominates {where}: the fronts cross (near C_size {cross:.4g} bits) or "
                "tie.")


def dominance(a: Sequence[Point], b: Sequence[Point], a_name: str = "A", b_name: str = "B") -> Verdict:
    """Def. 4.1 between two measured fronts ``(C_size, top-1)``."""
    fa, fb = _front(a), _front(b)
    lo, hi = max(fa[0][0], fb[0][0]), min(fa[-1][0], fb[-1][0])
    if lo > hi:
        return Verdict(a_name, b_name, None, None, (), ())
    sizes = tuple(sorted({s for s, _ in fa + fb if lo <= s <= hi} | {lo, hi}))
    margins = tuple(front_accuracy(fa, s) - front_accuracy(fb, s) for s in sizes)
    winner = "a" if all(m > 0 for m in margins) else "b" if all(m < 0 for m in margins) else None
    return Verdict(a_name, b_name, winner, (lo, hi), sizes, margins)
