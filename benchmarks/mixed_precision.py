"""Learned post-training mixed precision (seed 004 App. A) on ResNet-20 (CIFAR-10 subset), fbgemm spec.

Sections (each prints a table; all go into one JSON):

1. ``weights``: weights-only allocation (activations 8-bit), average 3.0 and 4.0 weight bits with the first and
   last layer counted, any integer 2..8, one row per seed and estimator (``ste``: the paper's rounding with a
   straight-through gradient; ``dither``: uniform noise of one step during the search), beside uniform W3 / W4
   and the sensitivity greedy (computed once per seed, on the ``ste`` rows).
2. ``allowed``: any integer vs {2, 4, 8} at averages 3, 4 and 6 (seed 004 Obs. 5).
3. ``wa``: weights and activations at average 4 / 4, first and last layer in vs out of the budget (Table 2).
4. ``fmap``: a largest-feature-map budget equal to uniform A4's largest map: the analytic allocation (Obs. 6) vs
   uniform A4 (weights 8-bit, percentile clipping of activations).
5. ``labels``: pseudo-labels vs labels at an average of 4 weight bits (Obs. 7).

    python benchmarks/mixed_precision.py                            # everything (about an hour on 2 cores)
    python benchmarks/mixed_precision.py --sections weights --seeds 0
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from _common import print_table, write_json
from quantbench.mixed.config import MixedConfig
from quantbench.mixed.pipeline import run_mixed
from quantbench.ptq.pipeline import build_context

SHARED = Path(__file__).resolve().parents[2] / "shared"
BASE = {"model": "resnet20_cifar", "weights": str(SHARED / "models/resnet20_cifar10.safetensors"),
        "data": f"cifar10:{SHARED / 'data/cifar10'}", "backend": "fbgemm"}


def row(ctx: Any, section: str, steps: int, **kw: Any) -> dict[str, Any]:
    cfg = MixedConfig(**BASE, steps=steps, **kw)
    t0 = time.perf_counter()
    r = run_mixed(cfg, progress=False, context=ctx)
    d = r.to_dict()
    s = d["search"] or {}
    out = {"section": section, "estimator": cfg.estimator, "w_avg": cfg.w_avg, "a_avg": cfg.a_avg,
           "a_max_fmap": cfg.a_max_fmap,
           "allowed": "{" + ",".join(map(str, cfg.allowed)) + "}" if cfg.allowed else "any",
           "first_last": cfg.first_last_budget, "labels": cfg.labels, "seed": cfg.seed,
           "top1": round(d["quant_top1"], 2), "agreement": round(100 * d["agreement"], 2),
           "avg_w": _r(d["avg_weight_bits"]), "avg_a": _r(d["avg_activation_bits"]),
           "max_fmap_B": _r(d["max_fmap_bytes"]), "search_s": round(s.get("seconds", 0.0), 1),
           "selected_step": s.get("best_step"), "repaired": s.get("repaired"),
           "wall_s": round(time.perf_counter() - t0, 1)}
    for name, b in d["baselines"].items():
        out[f"{name}_allocation"] = b["allocation"]
        out[f"{name}_top1"] = round(b["quant_top1"], 2)
        out[f"{name}_agreement"] = round(100 * b["agreement"], 2)
        out[f"{name}_avg_w"] = _r(b.get("avg_weight_bits"))
        out[f"{name}_avg_a"] = _r(b.get("avg_activation_bits"))
    out["allocation"] = d["allocation"]
    print({k: v for k, v in out.items() if not k.endswith("allocation")}, flush=True)
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def show(title: str, rows: list[dict[str, Any]]) -> None:
    cols = [c for c in rows[0] if not c.endswith("allocation")]
    print_table(title, cols, [[r.get(c) for c in cols] for r in rows])


def mean_std(rows: list[dict[str, Any]], key: str) -> str:
    v = [r[key] for r in rows if r.get(key) is not None]
    if len(v) > 1:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"
    return f"{v[0]:.2f}" if v else "-"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each weights-only target."""
    out = []
    for t, est in sorted({(r["w_avg"], r["estimator"]) for r in rows}):
        rs = [r for r in rows if r["w_avg"] == t and r["estimator"] == est]
        out.append({"w_avg": t, "estimator": est, "seeds": len(rs), **{name: mean_std(rs, key) for name, key in (
            ("learned_top1", "top1"), ("learned_agreement", "agreement"), ("uniform_top1", "uniform_top1"),
            ("uniform_agreement", "uniform_agreement"), ("greedy_top1", "greedy_top1"), ("learned_avg_w", "avg_w"),
            ("search_s", "search_s"))}})
    return out


def plot_allocations(results: list[Path], out: Path, w_avg: float = 3.0, seed: int = 0) -> None:
    """Bits per layer of the weights-only allocations at ``w_avg`` (seed ``seed``): learned (each estimator),
    the greedy's and uniform, one line each, in graph order."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for p in results for r in json.loads(p.read_text()).get("weights", [])
            if r["w_avg"] == w_avg and r["seed"] == seed]
    if not rows:
        raise SystemExit(f"no weights-section rows at w_avg {w_avg}, seed {seed} in {results}")
    lines = {f"learned ({r['estimator']}): {r['top1']:.2f} %": r["allocation"]["weights"] for r in rows}
    base = next((r for r in rows if r.get("uniform_top1") is not None), None)
    if base is not None and base.get("greedy_allocation"):
        lines[f"greedy: {base['greedy_top1']:.2f} %"] = base["greedy_allocation"]["weights"]
    names = list(next(iter(lines.values())))
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for i, (label, bits) in enumerate(lines.items()):
        ax.plot(range(len(names)), [bits[n] for n in names], marker="os^d"[i % 4], label=label)
    if base is not None:
        ax.axhline(w_avg, color="grey", ls="--", lw=1, label=f"uniform W{w_avg:g}: {base['uniform_top1']:.2f} %")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("weight bits")
    ax.set_title(f"ResNet-20, fbgemm, average {w_avg:g} weight bits (first/last counted), seed {seed}")
    ax.legend(fontsize=7)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="weights,allowed,wa,fmap,labels")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--estimators", default="ste,dither", help="estimators of the weights section")
    ap.add_argument("--targets", default="3,4", help="average weight bits of the weights section")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--plot-from", type=Path, nargs="*", default=None,
                    help="only plot the weights-only allocations of these result JSONs (to --plot)")
    ap.add_argument("--plot", type=Path, default=Path("mixed_bits.png"))
    args = ap.parse_args()
    if args.plot_from:
        plot_allocations(args.plot_from, args.plot)
        return
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    ctx = build_context(MixedConfig(**BASE, w_avg=4), progress=False)
    out: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    steps = args.steps

    if "weights" in sections:
        rows = [row(ctx, "weights", steps, w_avg=t, seed=s, estimator=e, baselines=e == "ste")
                for s in seeds for t in map(float, args.targets.split(",")) for e in args.estimators.split(",")]
        out["weights"], out["weights_summary"] = rows, summarise(rows)
        show("Weights-only mixed precision vs uniform (activations 8-bit, first/last counted)", rows)
        show("Weights-only: mean ± std over seeds", out["weights_summary"])
    if "allowed" in sections:
        rows = [row(ctx, "allowed", steps, w_avg=t, allowed=[2, 4, 8], baselines=False) for t in (3.0, 4.0, 6.0)]
        rows.append(row(ctx, "allowed", steps, w_avg=6.0, baselines=False))
        out["allowed"] = rows
        show("Any integer vs {2, 4, 8} (seed 0; any-integer rows at 3 and 4 are the weights section's seed 0)", rows)
    if "wa" in sections:
        rows = [row(ctx, "wa", steps, w_avg=4.0, a_avg=4.0, first_last_budget=fl) for fl in ("in", "out")]
        out["wa"] = rows
        show("Weights and activations at 4 / 4: first/last in vs out of the budget", rows)
    if "fmap" in sections:
        probe = run_mixed(MixedConfig(**BASE, a_max_fmap=1e9, baselines=False), progress=False, context=ctx)
        budget = 4 * max(probe.layer_sizes["activations"].values()) / 8  # uniform A4's largest feature map
        rows = [row(ctx, "fmap", steps, a_max_fmap=budget, a_observer="quantile")]
        out["fmap"] = rows
        show(f"Largest feature map <= {budget:g} bytes (uniform A4's): analytic vs uniform A4", rows)
    if "labels" in sections:
        rows = [row(ctx, "labels", steps, w_avg=4.0, labels="pseudo")]
        out["labels"] = rows
        show("Pseudo-labels at 4-bit average weights (labels: the weights section's seed 0)", rows)
    write_json("mixed_precision", out, args.out)


if __name__ == "__main__":
    main()
