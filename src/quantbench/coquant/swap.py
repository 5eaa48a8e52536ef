"""Swap(M_b, M_t, p) of seed 002 Algorithm 1: the student network with teacher blocks swapped in at random.

*Interpretation* (the supplement does not define the granularity or the per-block probability): the blocks are the
reconstruction partition's units; block ``l`` of ``L`` keeps the student's precision with probability
``p_l = p1 + (1 - p1) l / (L - 1)`` (the first block most often swapped, the last never), and ``p1`` rises linearly
from its initial value (Table 2: 0.9 for CIFAR-10 ResNet) to 1 at the end of training.
"""

from __future__ import annotations

import torch


def p1_at(p1_init: float, progress: float) -> float:
    """``p1`` after ``progress`` (0 at the first step, 1 at the last) of training: linear from ``p1_init`` to 1."""
    if not 0.0 <= p1_init <= 1.0:
        raise ValueError(f"p1 must be in [0, 1], got {p1_init}")
    t = min(max(progress, 0.0), 1.0)
    return p1_init + (1.0 - p1_init) * t


def block_probabilities(p1: float, n_blocks: int) -> torch.Tensor:
    """``p_l`` (keep the student's block) for ``l = 0 .. L-1``, float64."""
    if n_blocks == 1:
        return torch.tensor([p1], dtype=torch.float64)
    ell = torch.arange(n_blocks, dtype=torch.float64)
    return p1 + (1.0 - p1) * ell / (n_blocks - 1)


def swap_bits(student: int, teacher: int, keep: torch.Tensor, generator: torch.Generator | None = None
              ) -> list[int]:
    """The bit-width of every block for one Swap forward: block ``l`` the student's with probability ``keep[l]``
    (:func:`block_probabilities`), else the teacher's. All ones: the student network; all zeros: the teacher."""
    draw = torch.rand(keep.numel(), generator=generator, dtype=torch.float64)
    return [student if k else teacher for k in (draw < keep.to(torch.float64)).tolist()]
