"""Learning a mixed-precision allocation (seed 004 App. A; Uhlich et al. 2020).

Minimise ``CE(f(x; theta, B), y) + lam max(avg_w(B) - target_w, 0) + lam max(avg_a(B) - target_a, 0)`` over the
bit-widths ``B`` only (the network's weights and BN statistics stay fixed; activation ranges learn with the bits
when activations are allocated). The step whose allocation meets every constraint with the best exponential
moving average of the training accuracy is returned, since the last step often does not meet them; when no step
did, the last allocation is repaired (bits lowered where they cost the least size) and the report says so.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from quantbench.errors import ConfigError
from quantbench.graph.quantize import activation_quantizers, weight_layers
from quantbench.mixed.allocation import Allocation
from quantbench.mixed.budget import Budget
from quantbench.mixed.config import MixedConfig
from quantbench.mixed.rule import BITWIDTH, BitWidthRule
from quantbench.observers import build_observer
from quantbench.quant.quantizer import Quantizer
from quantbench.utils.progress import LossBar


@dataclass
class Searchable:
    """A calibrated prepared model whose allocated quantizers carry a :class:`BitWidthRule`."""

    gm: fx.GraphModule
    w_rules: dict[str, BitWidthRule]  # layer name -> rule
    a_rules: dict[str, BitWidthRule]  # activation quantizer name -> rule
    #: bits decided outside the search (first/last at 8, an analytic activation allocation): part of every
    #: allocation, so the budget sees them, never changed
    fixed: Allocation = field(default_factory=Allocation)

    def rules(self) -> list[BitWidthRule]:
        return [*self.w_rules.values(), *self.a_rules.values()]

    def allocation(self) -> Allocation:
        return Allocation({**self.fixed.weights, **{n: r.rounded_bits() for n, r in self.w_rules.items()}},
                          {**self.fixed.activations, **{n: r.rounded_bits() for n, r in self.a_rules.items()}})

    def movable(self) -> set[str]:
        return set(self.w_rules) | set(self.a_rules)

    def set(self, alloc: Allocation) -> None:
        """Set the learned quantizers' bits (names without a rule are fixed and skipped)."""
        for n, b in alloc.weights.items():
            if n in self.w_rules:
                self.w_rules[n].set_bits(b)
        for n, b in alloc.activations.items():
            if n in self.a_rules:
                self.a_rules[n].set_bits(b)


@torch.no_grad()
def weight_grids(q: Quantizer, w: Tensor, allowed: list[int]) -> tuple[Tensor, Tensor]:
    """The calibrator's ``(K, C)`` scales and zero-points for weight ``w`` at each allowed bit-width."""
    scales, zps = [], []
    for b in allowed:
        obs = build_observer(q.observer_name, q.scheme.with_bits(b), is_weight=True, **q.observer_options)
        obs.observe(w.detach())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # clipping warnings at 2-3 bits are expected here
            s, z, _, _ = obs.calculate_qparams()
        scales.append(s.reshape(-1).float())
        zps.append(z.reshape(-1).float())
    return torch.stack(scales), torch.stack(zps)


def attach(gm: fx.GraphModule, w_names: list[str], a_names: list[str], allowed: list[int], start: float,
           hardware: bool = True, dither: bool = False, fixed: Allocation | None = None) -> Searchable:
    """Give the quantizers of layers ``w_names`` and activation quantizers ``a_names`` a learned bit-width
    (``fixed``: bits decided elsewhere that the prepared graph already has)."""
    w_rules: dict[str, BitWidthRule] = {}
    a_rules: dict[str, BitWidthRule] = {}
    for name, layer in weight_layers(gm):
        q = layer.weight_quantizer
        if name not in w_names or q is None:
            continue
        rule = q.enable_learning(BITWIDTH, None, hardware, init="paper")
        assert isinstance(rule, BitWidthRule)
        rule.set_allowed(allowed, start)
        rule.set_weight_grids(*weight_grids(q, layer.folded_weight_bias()[0], allowed))
        rule.dither = dither
        w_rules[name] = rule
    for _, q in activation_quantizers(gm):
        if q.name in a_names:
            rule = q.enable_learning(BITWIDTH, None, hardware, init="calibrator")
            assert isinstance(rule, BitWidthRule)
            rule.set_allowed(allowed, start)
            rule.dither = dither
            a_rules[q.name] = rule
    return Searchable(gm, w_rules, a_rules, fixed or Allocation())


@dataclass
class SearchReport:
    """What the learned search did: steps, time, the selected step and the curve (every ``log_every`` steps)."""

    steps: int
    seconds: float
    best_step: int | None  # None: no step met the constraints (the allocation was repaired)
    best_ema_accuracy: float | None
    met_constraints_steps: int
    repaired: bool
    curve: list[dict[str, Any]] = field(default_factory=list)


def _bits(rules: dict[str, BitWidthRule]) -> Tensor | None:
    return torch.stack([r.bits() for r in rules.values()]) if rules else None


def learn(s: Searchable, budget: Budget, images: Tensor, labels: Tensor, cfg: MixedConfig,
          device: str = "cpu", progress: bool = True, log_every: int = 10) -> tuple[Allocation, SearchReport]:
    """Learn the bit-widths of ``s`` on ``images`` / ``labels`` under ``budget`` (seed 004 App. A)."""
    gm = s.gm
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    bit_params = [r.log_bits for r in s.rules()]
    range_params = [p for r in s.a_rules.values() for p in (r.lo, r.hi)]
    for p in bit_params + range_params:
        p.requires_grad_(True)
    groups = [{"params": bit_params}] + ([{"params": range_params}] if range_params else [])
    opt = torch.optim.Adam(groups, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    order = torch.randperm(n, generator=gen)
    pos = 0
    ema: float | None = None
    best: tuple[float, int, Allocation] | None = None
    met = 0
    curve: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with LossBar(1, "learning the bit allocation", progress) as bar:
        bar.start(f"{len(s.w_rules)} weight / {len(s.a_rules)} activation bit-widths", cfg.steps)
        for step in range(cfg.steps):
            if pos + cfg.batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + cfg.batch_size]
            pos += cfg.batch_size
            x, y = images[idx].to(device), labels[idx].to(device)
            alloc = s.allocation()  # the allocation this forward runs
            logits = gm(x)
            ce = F.cross_entropy(logits, y)
            pen = budget.penalty(_bits(s.w_rules), _bits(s.a_rules))
            loss = ce + pen.to(ce)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for r in s.rules():
                r.clamp_()
            acc = float((logits.detach().argmax(1) == y).float().mean())
            ema = acc if ema is None else cfg.ema * ema + (1 - cfg.ema) * acc
            ok = budget.satisfied(alloc.weights, alloc.activations)
            met += ok
            if ok and (best is None or ema > best[0]):
                best = (ema, step, alloc)
            if step % log_every == 0 or step == cfg.steps - 1:
                avg = budget.averages(alloc.weights, alloc.activations)
                curve.append({"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()),
                              "penalty": float(pen.detach()), "ema_accuracy": ema, "met": ok, **avg})
                bar.update(step + 1, float(loss.detach()), _status(avg, ok, ema))
    seconds = time.perf_counter() - t0
    if best is None:
        final = repair(s.allocation(), budget, cfg.bit_set(), s.movable())
        return final, SearchReport(cfg.steps, seconds, None, None, 0, True, curve)
    return best[2], SearchReport(cfg.steps, seconds, best[1], best[0], met, False, curve)


def _status(avg: dict[str, float | None], ok: bool, ema: float) -> str:
    """The progress bar's text: current averages, whether they meet the constraints, the EMA accuracy."""
    parts = [f"{k} {v:.2f}" for k, v in (("W", avg["avg_weight_bits"]), ("A", avg["avg_activation_bits"]))
             if v is not None]
    return ", ".join([*parts, "meets the budget" if ok else "over budget", f"EMA acc {ema:.3f}"])


def repair(alloc: Allocation, budget: Budget, allowed: list[int], movable: set[str]) -> Allocation:
    """Lower bit-widths one allowed step at a time until ``alloc`` meets ``budget``: each time the ``movable``
    quantizer (of the constraint that is violated) whose step saves the most size (bits saved x parameters or
    elements; for a feature-map budget only maps above it count). Raises ConfigError if even that cannot."""
    levels = sorted(allowed)
    w, a = dict(alloc.weights), dict(alloc.activations)
    w_size = {k: n for k, n in zip(budget.w_names, budget.w_sizes, strict=True) if k in movable}
    a_size = {k: n for k, n in zip(budget.a_names, budget.a_sizes, strict=True) if k in movable}

    def lower(bits: dict[str, int], sizes: dict[str, int], over: float | None = None) -> bool:
        cands = []
        for k, n in sizes.items():
            below = [b for b in levels if b < bits[k]]
            if below and (over is None or bits[k] * n > over):
                cands.append(((bits[k] - below[-1]) * n, k, below[-1]))
        if not cands:
            return False
        _, k, nb = max(cands)
        bits[k] = nb
        return True

    while not budget.satisfied(w, a):
        w_over = budget.weights_over(w)
        fmap = 8 * budget.a_max_fmap_bytes if budget.a_max_fmap_bytes is not None else None
        if not (lower(w, w_size) if w_over else lower(a, a_size, fmap)):
            raise ConfigError("the constraints cannot be met even with every allocated quantizer at the smallest "
                              f"allowed bit-width ({levels[0]}): raise the targets or allow fewer bits")
    return Allocation(w, a)
