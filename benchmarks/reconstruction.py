"""Reconstruction PTQ on ResNet-20 (CIFAR-10 subset): nearest vs AdaRound vs BRECQ vs QDrop per backend and bits.

Each row: top-1, agreement with FP32, reconstruction seconds, forward passes over the reconstruction set the
caching cost, peak RSS during the row, and the optimisation step of the largest unit relative to a plain
forward + backward of the same unit. ``--rows headline`` runs the issue's acceptance rows 1-2 with the CPU
preset (1 000 iterations per unit); ``--rows grid`` runs every backend x {W4A8, W4A4, W2A4} x method with
``--iters`` (e.g. 200, a faster preset named in each row).

    python benchmarks/reconstruction.py --rows headline                 # acceptance 1-2
    python benchmarks/reconstruction.py --rows grid --iters 200         # acceptance 3
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path
from typing import Any

import torch

from _common import median_time, print_table, write_json
from quantbench.config import PTQConfig
from quantbench.ptq.pipeline import build_context, run_ptq
from quantbench.qat.quantizers.lsq_kernel import fused_kernels_available
from quantbench.quant.drop import drop
from quantbench.quant.quantizer import Quantizer
from quantbench.recon.config import ReconOptions
from quantbench.recon.reconstruct import float_mode
from quantbench.recon.units import extract, partition

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = {"resnet20_cifar": SHARED / "models/resnet20_cifar10.safetensors",
          "resnet32_cifar": SHARED / "models/resnet32_cifar10.safetensors"}
HEADLINE = [  # (model, backend, w_bits, a_bits, methods)
    ("resnet20_cifar", "academic", 4, 8, ["nearest", "adaround", "brecq", "qdrop"]),
    ("resnet20_cifar", "academic", 4, 4, ["nearest", "adaround", "brecq", "qdrop"]),
    ("resnet20_cifar", "tensorrt", 4, 4, ["nearest", "adaround", "brecq", "qdrop"]),
]
GRID_BACKENDS = ["academic", "tensorrt", "snpe", "tvm", "acl", "fbgemm", "onnxruntime"]
GRID_BITS = [(4, 8), (4, 4), (2, 4)]
METHODS = ["nearest", "adaround", "brecq", "qdrop"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_row(model: str, backend: str, w: int, a: int, method: str, iters: int | None, contexts: dict) -> dict:
    cfg = PTQConfig(model=model, weights=str(MODELS[model]), data=f"cifar10:{SHARED / 'data/cifar10'}",
                    backend=backend, w_bits=w, a_bits=a, method=method, recon=ReconOptions(iters=iters))
    if model not in contexts:
        contexts[model] = build_context(cfg, progress=False)
    t0 = time.perf_counter()
    r = run_ptq(cfg, progress=False, context=contexts[model])
    rec = r.extra.get("reconstruction", {})
    return {"model": model, "backend": backend, "bits": f"W{w}A{a}", "method": method,
            "preset": rec.get("preset", "-"), "top1": round(r.quant_top1, 2), "fp_top1": round(r.fp_top1, 2),
            "agreement": round(100 * r.agreement, 2), "recon_s": round(r.recon_seconds or 0.0, 1),
            "wall_s": round(time.perf_counter() - t0, 1), "passes": round(rec.get("passes", 0.0), 2),
            "peak_rss_mib": round(peak_rss_mib()), "units": len(rec.get("units", [])),
            "rss_growth_mib": _growth(rec.get("units", []))}


def _growth(units: list[dict]) -> float | None:
    """Growth of the peak RSS from the first unit to the last (0: memory flat across units)."""
    rss = [u["peak_rss_mib"] for u in units if u.get("peak_rss_mib") is not None]
    return round(rss[-1] - rss[0], 1) if rss else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", choices=["headline", "grid", "resnet32"], default="headline")
    ap.add_argument("--iters", type=int, default=None, help="iterations per unit (default: the CPU preset)")
    ap.add_argument("--backends", default=",".join(GRID_BACKENDS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--step-only", action="store_true", help="only the step-time comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    if args.rows == "headline":
        plan = [(m, b, w, a, me) for m, b, w, a, ms in HEADLINE for me in ms if me in methods]
    elif args.rows == "resnet32":
        plan = [("resnet32_cifar", b, 4, 4, me) for b in ("academic", "tensorrt") for me in methods]
    else:
        plan = [("resnet20_cifar", b, w, a, me) for b in args.backends.split(",") for w, a in GRID_BITS
                for me in methods]
    rows: list[dict] = []
    contexts: dict = {}
    if args.step_only:
        plan = []
    cols = ["model", "backend", "bits", "method", "preset", "top1", "agreement", "recon_s", "passes", "peak_rss_mib",
            "rss_growth_mib"]
    for spec in plan:
        row = run_row(*spec, args.iters, contexts)
        rows.append(row)
        print(" | ".join(str(row[c]) for c in cols), flush=True)
    # the optimisation step vs a plain forward + backward of the same unit (QDrop, tensorrt W4A4)
    cfg = PTQConfig(model="resnet20_cifar", weights=str(MODELS["resnet20_cifar"]),
                    data=f"cifar10:{SHARED / 'data/cifar10'}", backend="tensorrt", w_bits=4, a_bits=4,
                    method="qdrop", recon=ReconOptions(iters=1))
    ctx = contexts.get("resnet20_cifar") or build_context(cfg, progress=False)
    ratio = _learning_step_ratio(cfg, ctx)
    print_table(f"Reconstruction ({args.rows})", cols, [[r[c] for c in cols] for r in rows])
    print_table("QDrop step / plain float forward+backward per unit (tensorrt W4A4, batch 32)",
                ["unit", "layers", "step_ms", "plain_ms", "ratio", "fakequant_ms", "ratio_fakequant"],
                [[u[c] for c in ("unit", "layers", "step_ms", "plain_ms", "ratio", "fakequant_ms", "ratio_fakequant")]
                 for u in ratio["units"]])
    print(f"fused kernels: {ratio['fused']}; whole reconstruction (sum over units): {ratio['ratio_of_sums']:.2f}x a "
          f"float forward+backward, {ratio['ratio_of_sums_fakequant']:.2f}x a static fake-quant one; largest unit "
          f"ratio {ratio['max_unit_ratio']:.2f}x")
    write_json(f"reconstruction_{args.rows}", {"args": vars(args) | {"out": str(args.out)}, "rows": rows,
                                               "step_ratio": ratio}, args.out)


def _learning_step_ratio(cfg: PTQConfig, ctx: Any) -> dict[str, Any]:
    """Every unit in QDrop's learning state (soft rounding, LSQ steps, dropping at 0.5, Adam): its step time
    over a plain float forward + backward (weight gradients, SGD-free) of the same unit on the same batch of 32.
    Returns the per-unit ratios, the ratio of the sums (the whole reconstruction's step cost) and the largest."""
    from quantbench.data import calibration_subset, make_loader
    from quantbench.graph.quantize import prepare
    from quantbench.ptq import calibrate
    from quantbench.recon.adaround import ADAROUND

    gm = prepare(ctx.model, cfg.resolved_backend(), ctx.example, cfg.w_observer, cfg.a_observer)
    calib = calibration_subset(ctx.bundle, 256, 0)
    calibrate(gm, make_loader(calib, 64), "cpu", False)
    x = torch.stack([calib[i][0] for i in range(32)])
    units = partition(gm)
    inputs = []
    with torch.no_grad():
        for u in units:
            inputs.append(x)
            x = extract(gm, u.input, u.output, u.nodes)(x)
    for prm in gm.parameters():
        prm.requires_grad_(False)
    for m in gm.modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None:
            w, _ = m.folded_weight_bias()
            rule = wq.enable_learning(ADAROUND, None, True, "calibrator")
            rule.init_from_tensor(w.detach())
            rule.mark_initialized()
    fused = fused_kernels_available("cpu")  # what reconstruction uses by default
    for m in gm.modules():
        if isinstance(m, Quantizer) and not m.is_weight and m.rule is None:
            m.enable_learning("lsq", None, True, "calibrator").fused_kernels = fused
            m.drop_prob = 0.5
    rows = []
    for u, xin in zip(units, inputs, strict=True):
        sub = extract(gm, u.input, u.output, u.nodes)
        rows.append({"unit": u.name, "layers": len(u.layers), **_step_times(gm, sub, xin)})
    total_q = sum(r["step_ms"] for r in rows)
    total_p = sum(r["plain_ms"] for r in rows)
    total_s = sum(r["fakequant_ms"] for r in rows)
    return {"units": rows, "fused": fused, "ratio_of_sums": round(total_q / total_p, 3),
            "ratio_of_sums_fakequant": round(total_q / total_s, 3), "max_unit_ratio": max(r["ratio"] for r in rows)}


def _step_times(gm: Any, sub: Any, xb: torch.Tensor, iters: int = 20) -> dict[str, float]:
    qs = [m for m in sub.modules() if isinstance(m, Quantizer)]
    learned = [p for p in sub.parameters() if p.requires_grad]
    weights = [m.module.weight for m in sub.modules() if hasattr(m, "module") and hasattr(m.module, "weight")]
    opt = torch.optim.Adam(learned, lr=1e-4)
    mix = torch.zeros_like(xb)

    def plain() -> None:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        with float_mode(qs):
            (sub(xb) ** 2).mean().backward()
        for w in weights:
            w.requires_grad_(False)

    def static() -> None:  # the calibrated unit as QAT would train it: static fake quantization, STE
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        for q in qs:
            q.learning = False  # the stored scale / zero-point; the rule is kept
        try:
            (sub(xb) ** 2).mean().backward()
        finally:
            for q in qs:
                q.learning = q.rule is not None
            for w in weights:
                w.requires_grad_(False)

    def quant() -> None:
        opt.zero_grad(set_to_none=True)
        x = drop(xb, mix, 0.5)  # the unit input mixed with the float network's
        (sub(x) ** 2).mean().backward()
        opt.step()

    q, p, st = median_time(quant, iters), median_time(plain, iters), median_time(static, iters)
    return {"step_ms": round(1000 * q, 3), "plain_ms": round(1000 * p, 3), "ratio": round(q / p, 3),
            "fakequant_ms": round(1000 * st, 3), "ratio_fakequant": round(q / st, 3)}


if __name__ == "__main__":
    main()
