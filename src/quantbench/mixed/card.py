"""What a quantization card records of a mixed-precision search (seed 004 Table 4 and Obs. 4-7)."""

from __future__ import annotations

from typing import Any

from quantbench.mixed.pipeline import MixedResult


def search_facts(result: MixedResult, train_size: int) -> dict[str, Any]:
    """The card's ``mixed_precision.search``: the *allowed* set, the constraint, first/last in the budget, labels,
    images, steps, time (and as a fraction of one epoch), the achieved averages and the baselines."""
    c = result.constraint
    allowed = c["allowed"]
    sides = {"weights": allowed} if c["weights_in_budget"] else {}
    if c["activations_in_budget"]:
        sides["activations"] = allowed  # not allocated: the card shows the bits the run uses
    search = result.search
    seen = (search.steps * c["batch_size"]) if search else 0
    return {
        **c, "allowed_bitwidths": sides,
        "seconds": result.seconds, "search_seconds": search.seconds if search else 0.0,
        "fraction_of_epoch": round(seen / train_size, 4) if train_size else "n/a",
        "selected_step": search.best_step if search else None, "repaired": bool(search and search.repaired),
        "achieved": dict(result.averages),
        "baselines": {k: {"quant_top1": v["quant_top1"], "avg_weight_bits": v.get("avg_weight_bits"),
                          "avg_activation_bits": v.get("avg_activation_bits")} for k, v in result.baselines.items()},
        "notes": list(result.notes),
    }
