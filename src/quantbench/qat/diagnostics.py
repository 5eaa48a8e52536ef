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


class DivergenceError(QuantbenchError, RuntimeError):
    """The loss became NaN or infinite; training stopped."""


class EMA:
    """``v <- m v + (1 - m) x`` (momentum 0.3 for the training-accuracy curve, seed 001 B.1)."""

    def __init__(self, momentum: float = 0.3, value: float | None = None) -> None:
        self.momentum, self.value = momentum, value

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.momentum * self.value + (1 - self.momentum) * x
        return self.value


class JsonLog:
    """Append-only JSON-lines log (one record per line); only the main process writes."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _finite(t: Tensor) -> bool:
    return bool(torch.isfinite(t).all())


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


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
