"""Seed 002 Algorithm 1 as a loss: every bit-width of B on one mini-batch, summed, back-propagated once.

The highest precision b1 is trained with cross-entropy. Every lower b (from high to low) picks a teacher t among the
higher precisions (:mod:`quantbench.coquant.teacher`), runs the network with teacher blocks swapped in
(:mod:`quantbench.coquant.swap`) and adds ``CE(y_b, y) + KL(y_t || y_b)``. *Interpretation*: ``y_t`` is the
teacher's own output on this batch (computed at its turn, detached) and the KL uses temperature 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantbench.coquant.swap import block_probabilities, p1_at, swap_bits
from quantbench.coquant.switch import Switched
from quantbench.coquant.teacher import confidence, output_distance, select_teacher, weight_distance
from quantbench.graph.qmodules import QuantWeighted


@dataclass
class CoQuantLoss:
    """``loss(model, x, y) -> (total loss, the highest precision's logits)``; ``progress()`` gives the fraction of
    training done (for p1's schedule)."""

    sw: Switched
    p1: float = 0.9
    lam: float = 0.001
    distance: Literal["weights", "kl"] = "weights"
    temperature: float = 1.0
    kd: bool = True  # False: each precision with CE alone (no teacher, no swap)
    #: fraction of training over which the lower precisions' losses ramp linearly from 0 to 1 (0: summed from the
    #: start, as Algorithm 1; a deviation for short fine-tuning, where their near-chance start drags the weights)
    ramp: float = 0.0
    #: "dynamic": seed 002's teacher selection and Swap; "recursive": Any-Precision DNNs' recursive distillation
    #: (each precision from the next higher one, no swap), the baseline
    teacher: Literal["dynamic", "recursive"] = "dynamic"
    progress: Callable[[], float] = lambda: 0.0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    #: the teacher each precision chose at the last step (for logs and tests)
    last_teachers: dict[int, int] = field(default_factory=dict)
    last_losses: dict[int, float] = field(default_factory=dict)

    def _weights(self, model: nn.Module) -> list[tuple[Tensor, object]]:
        pairs = []
        for m in model.modules():
            if isinstance(m, QuantWeighted) and m.weight_quantizer is not None:
                rule = m.weight_quantizer.rule
                if rule is not None and rule in self.sw.rules.values():
                    pairs.append((m.module.weight, rule))
        return pairs

    def _kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``KL(teacher || student)`` at temperature ``tau`` (times ``tau^2``), the teacher detached."""
        tau = self.temperature
        return F.kl_div(F.log_softmax(student.float() / tau, 1), F.log_softmax(teacher.detach().float() / tau, 1),
                        log_target=True, reduction="batchmean") * tau * tau

    def _teacher(self, model: nn.Module, x: Tensor, y: Tensor, b: int, higher: tuple[int, ...],
                 outs: dict[int, Tensor]) -> int:
        """The precision that teaches ``b``: the next higher one (recursive) or the best score (dynamic)."""
        if self.teacher == "recursive":
            return higher[-1]
        conf = {t: confidence(outs[t], y) for t in higher}
        if self.lam == 0:
            dist = dict.fromkeys(higher, 0.0)
        elif self.distance == "weights":
            pairs = self._weights(model)
            dist = {t: weight_distance(pairs, t, b) for t in higher}
        else:
            with torch.no_grad(), self.sw.state.at(b):
                plain = model(x)
            dist = {t: output_distance(outs[t], plain) for t in higher}
        return select_teacher(b, higher, conf, dist, self.lam)

    def ramp_weight(self) -> float:
        """The weight of the lower precisions' losses now (1 without a ramp)."""
        return min(1.0, self.progress() / self.ramp) if self.ramp > 0 else 1.0

    def terms(self) -> float:
        """How many per-precision losses the total sums now (the ramp's weights counted): the trainer's
        divergence monitor compares the total divided by this with chance level, as it does a single loss."""
        return 1.0 + self.ramp_weight() * (len(self.sw.state.trained) - 1)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        state = self.sw.state
        outs: dict[int, Tensor] = {}
        total: Tensor | None = None
        top_logits: Tensor | None = None
        keep = block_probabilities(p1_at(self.p1, self.progress()), state.n_blocks)
        for i, b in enumerate(state.trained):
            if i == 0 or not self.kd:
                with state.at(b):
                    yb = model(x)
                loss = F.cross_entropy(yb.float(), y)
            else:
                t = self._teacher(model, x, y, b, state.trained[:i], outs)
                self.last_teachers[b] = t
                bits = b if self.teacher == "recursive" else swap_bits(b, t, keep, self.generator)
                with state.at(bits, student=b):
                    yb = model(x)
                loss = F.cross_entropy(yb.float(), y) + self._kl(yb, outs[t])
            outs[b] = yb.detach()
            self.last_losses[b] = float(loss.detach())
            if i > 0 and self.ramp > 0:
                loss = loss * self.ramp_weight()
            total = loss if total is None else total + loss
            if i == 0:
                top_logits = yb
        assert total is not None and top_logits is not None
        return total, top_logits
