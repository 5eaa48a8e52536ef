"""Dynamic teacher selection (seed 002 Algorithm 1, Eq. 4): each lower precision picks its teacher among the higher
ones by ``score(t) = confidence(t) - lambda * distance(t, b)``.

*Interpretation* (Eq. 4 is not in the supplement): confidence is the mean softmax probability of the true class
under precision ``t`` on the batch; distance is, by default, the weight-space distance ``sum over quantized layers
of ||Q_t(W) - Q_b(W)||^2`` (lambda = 0.001 of Table 2 only makes sense for a large-scale distance); option ``kl``:
the mean KL divergence between the two precisions' outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def confidence(logits: Tensor, labels: Tensor) -> float:
    """Mean softmax probability of the true class."""
    p = F.softmax(logits.detach().float(), dim=1)
    return float(p.gather(1, labels.view(-1, 1)).mean())


def output_distance(teacher_logits: Tensor, student_logits: Tensor) -> float:
    """Mean KL(teacher || student) over the batch (the ``kl`` distance)."""
    return float(F.kl_div(F.log_softmax(student_logits.detach().float(), 1),
                          F.log_softmax(teacher_logits.detach().float(), 1), log_target=True, reduction="batchmean"))


def select_teacher(student: int, higher: Sequence[int], confidences: Mapping[int, float],
                   distances: Mapping[int, float], lam: float) -> int:
    """The higher precision with the best score (ties: the lower precision, the closer one)."""
    candidates = [t for t in higher if t > student]
    if not candidates:
        raise ValueError(f"no precision above {student} bits to teach it (given {list(higher)})")
    return max(candidates, key=lambda t: (confidences[t] - lam * distances[t], -t))


@torch.no_grad()
def weight_distance(pairs: Sequence[tuple[Tensor, object]], t: int, b: int) -> float:
    """``sum ||Q_t(W) - Q_b(W)||^2`` over ``(W, multi-bit rule)`` pairs."""
    total = 0.0
    for w, rule in pairs:
        wt = rule.at(t)(w)  # type: ignore[attr-defined]
        wb = rule.at(b)(w)  # type: ignore[attr-defined]
        total += float((wt - wb).pow(2).sum())
    return total
