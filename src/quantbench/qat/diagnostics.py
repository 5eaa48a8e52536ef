"""Diagnostics of a QAT run (seed 001 B): JSON-lines log, EMA-smoothed training accuracy, curves, clipping
ranges, and naming the quantizer that diverged."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantbench.errors import QuantbenchError
from quantbench.qat.prepare import qat_layers, qat_quantizers
from quantbench.utils.io import atomic_write_text


class DivergenceError(QuantbenchError, RuntimeError):
    """The loss became NaN or infinite (or, with ``on_divergence: stop``, diverged while finite); training
    stopped."""


class DivergenceWarning(UserWarning):
    """The training loss or the test accuracy says the run is going wrong, though the loss is still finite."""


class EMA:
    """``v <- m v + (1 - m) x`` (momentum 0.3 for the training-accuracy curve, seed 001 B.1)."""

    def __init__(self, momentum: float = 0.3, value: float | None = None) -> None:
        self.momentum, self.value = momentum, value

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.momentum * self.value + (1 - self.momentum) * x
        return self.value


#: the smoothed training loss is diverging when above LOSS_FACTOR x its best value so far and above chance level
LOSS_FACTOR = 2.0
LOSS_MOMENTUM = 0.5  # EMA over the logged losses (each already a mean over ``log_every`` iterations)
#: the test accuracy collapsed when it falls to at most CHANCE_FACTOR x chance from an init above 3 x chance
CHANCE_FACTOR = 1.5


class DivergenceMonitor:
    """Finds a run going wrong while its loss is finite (e.g. a learning rate far too high): the smoothed
    training loss rises above ``LOSS_FACTOR`` times its best value so far *and* above chance level ``ln C``
    (a classifier worse than guessing uniformly), or the test accuracy falls to chance from a PTQ init that was
    well above it. Each finding is reported once; the state is part of a checkpoint, so a resumed run reports
    what an uninterrupted one would."""

    def __init__(self) -> None:
        self.loss = EMA(LOSS_MOMENTUM)
        self.best: float | None = None
        self.init_test: float | None = None
        self.reported: list[str] = []

    def on_train(self, loss: float, num_classes: int) -> str | None:
        """A message when the smoothed loss diverges (None otherwise, or when already reported)."""
        smooth = self.loss.update(loss)
        if self.best is None or smooth < self.best:
            self.best = smooth
            return None
        chance = math.log(max(num_classes, 2))
        if "loss" in self.reported or smooth <= max(LOSS_FACTOR * self.best, chance):
            return None
        self.reported.append("loss")
        return (f"the training loss is diverging: its moving average rose to {smooth:.3g}, from {self.best:.3g} at "
                f"best, and is above chance level (ln {num_classes} = {chance:.3g})")

    def on_test(self, top1: float, num_classes: int) -> str | None:
        """A message when the test accuracy collapses to chance (the first call records the init's)."""
        if self.init_test is None:
            self.init_test = top1
            return None
        chance = 100.0 / max(num_classes, 1)
        if "accuracy" in self.reported or self.init_test <= 3 * chance or top1 > CHANCE_FACTOR * chance:
            return None
        self.reported.append("accuracy")
        return (f"the test top-1 collapsed to {top1:.2f} % from {self.init_test:.2f} % after the PTQ init "
                f"(chance is {chance:.2f} %)")

    def state(self) -> dict[str, Any]:
        return {"loss_ema": self.loss.value, "best": self.best, "init_test": self.init_test,
                "reported": list(self.reported)}

    def load(self, state: dict[str, Any]) -> None:
        self.loss.value, self.best = state["loss_ema"], state["best"]
        self.init_test, self.reported = state["init_test"], list(state["reported"])


class JsonLog:
    """Append-only JSON-lines log (one record per line); only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        if self.enabled:
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or infinity."""
    return [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point() and not _finite(v)]


@torch.no_grad()
def find_diverged(model: nn.Module, x: Tensor) -> str:
    """Which quantizer (or layer) diverged: non-finite parameters first, else the first quantizer whose output
    becomes non-finite on ``x`` while its input was finite."""
    bad = [name for name, q in qat_quantizers(model)
           if not all(_finite(t) for t in [*q.parameters(), *q.buffers()] if t.is_floating_point())]
    if bad:
        return f"quantizer {bad[0]!r} diverged (its parameters are not finite)" + (
            f", and {len(bad) - 1} more" if len(bad) > 1 else "")
    first: list[str] = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(_m: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            if not first and _finite(inputs[0]) and not _finite(out):
                first.append(name)
        return fn

    handles = [q.register_forward_hook(hook(name)) for name, q in qat_quantizers(model)]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    if first:
        return f"quantizer {first[0]!r} diverged (finite input, non-finite output)"
    layers = [name for name, m in qat_layers(model) if not all(_finite(p) for p in m.parameters())]
    if layers:
        return f"layer {layers[0]!r} has non-finite weights (no quantizer diverged)"
    return "no quantizer produced a non-finite value: the loss itself overflowed"


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Training accuracy (EMA) and test accuracy against iterations (seed 001 Fig. 7-10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_top1_ema"]) for r in history if r.get("event") == "train"]
    test = [(r["step"], r["test_top1"]) for r in history if r.get("event") == "test"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train (EMA 0.3)")
    if test:
        ax.plot(*zip(*test, strict=True), marker="o", label="test")
    ax.set_xlabel("iteration")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_clipping_ranges(table: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Per-layer activation clipping ranges ``[lo, hi]`` as bars, in graph order (seed 001 Fig. 11-13)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acts = [r for r in table if not r["weight"] and r.get("clip_lo")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(acts)), 4))
    lo = [min(r["clip_lo"]) for r in acts]
    hi = [max(r["clip_hi"]) for r in acts]
    ax.bar(range(len(acts)), [h - m for h, m in zip(hi, lo, strict=True)], bottom=lo, color="tab:blue", alpha=0.7)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(acts)), [r["name"] for r in acts], rotation=90, fontsize=6)
    ax.set_ylabel("activation clipping range")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
