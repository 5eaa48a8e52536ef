"""Data-free quantization on a CIFAR ResNet (ResNet-20 or -32, CIFAR-10 subset): real vs noise vs synthetic images.

Sections (each prints a table; all go into one JSON):

1. ``w8a8``: W8A8 on every backend, calibrated on 256 images of each source (sanity floor).
2. ``recon``: AdaRound academic W4A8 and QDrop W4A4 (academic, tensorrt) on 1 024 images of each source.
3. ``balance``: the float model's predicted classes on the synthetic sets (uniform = 10 % each).
4. ``cost``: generation seconds per generator for 256 and 1 024 images, beside calibration and reconstruction.
5. ``spread``: W8A8 on every backend, calibrated on several disjoint 256-image sets of each source (``--spread K``
   seeded draws of real training images; the four 256-image quarters of each 1 024-image synthetic set), so
   the real-vs-synthetic gap of section 1 can be read against how much one calibration set differs from
   another of the same source.
6. ``stats``: how each 256-image set looks to the network next to real images: DeepInversion's BNS loss (batches of
   32) on the plain images, the first BN's input variance over its running variance, how far the MSE calibrator's
   continuous activation scales (academic spec) are from those real images give (geometric mean and largest
   factor), the first layer's scale factor alone, how heavy-tailed the first BN's input is (kurtosis, 3 for a
   Gaussian), the pixels' standard deviation, and which of tvm's power-of-two activation scales land elsewhere
   than with real images.

Synthetic sets are generated once (1 024 images per generator, cached by identity); runs needing fewer take
the first images of the same set.

    python benchmarks/data_free.py                        # everything (about an hour on 2 cores)
    python benchmarks/data_free.py --sections w8a8,balance --generators zeroq
    python benchmarks/data_free.py --model resnet32_cifar --generators bns-ce --recon-real
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from _common import print_table, write_json
from quantbench.backends import backend_names
from quantbench.config import PTQConfig
from quantbench.data import make_loader
from quantbench.data.loaders import TensorImageDataset
from quantbench.datafree import make_images, parse_data_source
from quantbench.datafree.bns import BNSHooks
from quantbench.graph.quantize import activation_quantizers, prepare
from quantbench.models import get_entry
from quantbench.ptq import pipeline
from quantbench.ptq.calibrate import calibrate
from quantbench.ptq.pipeline import build_context, run_ptq
from quantbench.recon.config import ReconOptions

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODELS = {"resnet20_cifar": SHARED / "models/resnet20_cifar10.safetensors",
          "resnet32_cifar": SHARED / "models/resnet32_cifar10.safetensors"}
DATA = f"cifar10:{SHARED / 'data/cifar10'}"
BACKENDS = backend_names()  # every registered backend spec
N = 1024
SYNTHETIC_OPTIONS: dict[str, Any] = {}  # --synthetic-options: the generators' options (synthetic sources only)


def options_for(source: str) -> dict[str, Any]:
    return dict(SYNTHETIC_OPTIONS) if source.startswith("synthetic") else {}


def sources(generators: list[str], n: int = N) -> list[str]:
    return ["real", f"noise:{n}", *(f"synthetic:{g}:{n}" for g in generators)]


def run(ctx: Any, model: str, backend: str, w: int, a: int, source: str, method: str = "nearest",
        iters: int | None = None) -> dict[str, Any]:
    cfg = PTQConfig(model=model, weights=str(MODELS[model]), data=DATA, backend=backend, w_bits=w, a_bits=a,
                    calib_data=source, method=method, recon=ReconOptions(iters=iters),
                    synthetic_options=options_for(source))
    t0 = time.perf_counter()
    r = run_ptq(cfg, progress=False, context=ctx)
    src = r.extra.get("data_source", {})
    return {"model": model, "backend": backend, "bits": f"W{w}A{a}", "method": method, "source": source,
            "top1": round(r.quant_top1, 2), "agreement": round(100 * r.agreement, 2),
            "calib_s": round(r.calib_seconds, 2), "recon_s": round(r.recon_seconds or 0.0, 1),
            "generation_s": src.get("generation_seconds", 0.0), "wall_s": round(time.perf_counter() - t0, 1)}


@contextlib.contextmanager
def calibration_slice(offset: int) -> Iterator[None]:
    """Synthetic / noise runs calibrate on images ``offset .. offset + calib_size`` of their set (not the first)."""
    original = pipeline.RunImages.calibration

    def shifted(self: pipeline.RunImages) -> Any:
        if self.made is None:
            return original(self)
        n = self.cfg.calib_size
        return TensorImageDataset(self.made.images[offset:offset + n], torch.zeros(n, dtype=torch.long))

    pipeline.RunImages.calibration = shifted  # type: ignore[method-assign]
    try:
        yield
    finally:
        pipeline.RunImages.calibration = original  # type: ignore[method-assign]


def spread_rows(ctx: Any, model: str, gens: list[str], k_real: int, n: int) -> list[dict[str, Any]]:
    """Section 5: W8A8 top-1 over ``k_real`` seeded real 256-image sets and the 256-image quarters of each
    synthetic set, per backend."""
    fixed = ctx.bundle
    rows = []
    for b in BACKENDS:
        runs: dict[str, list[float]] = {}
        agree: dict[str, list[float]] = {}
        # seed s draws its own 256 training images (seed 0 is the shared fixed list)
        ctx.bundle = dataclasses.replace(fixed, calib_indices=None)
        try:
            for seed in range(k_real):
                cfg = PTQConfig(model=model, weights=str(MODELS[model]), data=DATA, backend=b, w_bits=8, a_bits=8,
                                seed=seed)
                r = run_ptq(cfg, progress=False, context=ctx)
                runs.setdefault("real", []).append(r.quant_top1)
                agree.setdefault("real", []).append(100 * r.agreement)
        finally:
            ctx.bundle = fixed
        for g in gens:
            for offset in range(0, n, 256):
                with calibration_slice(offset):
                    r2 = run(ctx, model, b, 8, 8, f"synthetic:{g}:{n}")
                    runs.setdefault(g, []).append(r2["top1"])
                    agree.setdefault(g, []).append(r2["agreement"])
        for src, tops in runs.items():
            rows.append({"backend": b, "source": src, "sets": len(tops), "mean": round(statistics.fmean(tops), 2),
                         "std": round(statistics.stdev(tops), 2) if len(tops) > 1 else 0.0,
                         "min": round(min(tops), 2), "max": round(max(tops), 2),
                         "min_agreement": round(min(agree[src]), 2), "top1": [round(t, 2) for t in tops],
                         "agreement": [round(a, 2) for a in agree[src]]})
            print(rows[-1], flush=True)
    return rows


def _calibrated_scales(ctx: Any, model: str, backend: str, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every activation quantizer's scale after calibrating W8A8 ``backend`` on ``images``."""
    cfg = PTQConfig(model=model, weights=str(MODELS[model]), data=DATA, backend=backend, w_bits=8, a_bits=8)
    gm = prepare(ctx.model, cfg.resolved_backend(), ctx.example, cfg.w_observer, cfg.a_observer,
                 cfg.w_observer_options, cfg.a_observer_options)
    calibrate(gm, make_loader(TensorImageDataset(images, torch.zeros(len(images), dtype=torch.long)),
                              cfg.calib_batch_size), "cpu", False)
    return {k: q.scale.detach().flatten().clone() for k, q in activation_quantizers(gm)}


def _kurtosis(x: torch.Tensor) -> float:
    """Mean over channels of the kurtosis of an (N, C, H, W) activation (3 for a Gaussian; heavier tails more)."""
    c = x.transpose(0, 1).reshape(x.shape[1], -1).double()
    z = (c - c.mean(1, keepdim=True)) / c.std(1, keepdim=True)
    return float((z ** 4).mean(1).mean())


def stats_rows(ctx: Any, model: str, gens: list[str], n: int) -> list[dict[str, Any]]:
    """Section 6: BN statistics and calibrated scales of 256 images of each source, against 256 real ones."""
    entry = get_entry(model)
    cfg = PTQConfig(model=model, weights=str(MODELS[model]), data=DATA)
    real_set = pipeline.run_images(cfg, ctx, False).calibration()
    real = torch.cat([x for x, _ in make_loader(real_set, 256)])
    aug_set = pipeline.bn_calibration_set(cfg, ctx.bundle, real_set, tuple(entry.input_size))
    torch.manual_seed(0)  # the augmentation's draws (the loader's global generator)
    sets = {"real": real, "real, training augmentation": torch.cat([x for x, _ in make_loader(aug_set, 256)])}
    for src in [f"noise:{n}", *(f"synthetic:{g}:{n}" for g in gens)]:
        sets[src] = make_images(parse_data_source(src), ctx.model, entry.input_size, 10, n, 0, "cpu", False,
                                options_for(src) or None, entry.mean, entry.std).images[:256]
    ref = {b: _calibrated_scales(ctx, model, b, real) for b in ("academic", "tvm")}
    net = ctx.model.eval()
    hooks = BNSHooks(net, "batch")
    first = next(k for k in ref["academic"] if not k.endswith("x_in"))  # the first layer's output quantizer
    rows = []
    for name, x in sets.items():
        losses, first_var, first_in = [], [], []
        grab = hooks.bns[0].register_forward_pre_hook(lambda _m, a, seen=first_in: seen.append(a[0].detach()))
        with torch.no_grad(), hooks.active():
            for i in range(0, len(x), 32):
                hooks.reset()
                net(x[i:i + 32])
                losses.append(float(hooks.loss()))
                first_var.append(float((hooks.stats[0][1] / hooks.bns[0].running_var).mean()))
        grab.remove()
        acad = _calibrated_scales(ctx, model, "academic", x)
        logs = [abs(math.log(float(acad[k][0] / ref["academic"][k][0]))) for k in acad]
        tvm = _calibrated_scales(ctx, model, "tvm", x)
        flips = {k.removeprefix("qb_act."): round(float(tvm[k][0] / ref["tvm"][k][0]), 3) for k in tvm
                 if not torch.equal(tvm[k], ref["tvm"][k])}
        rows.append({"source": name, "bns_loss": round(statistics.fmean(losses), 2),
                     "first_bn_var_ratio": round(statistics.fmean(first_var), 3),
                     "scale_factor_geomean": round(math.exp(statistics.fmean(logs)), 3),
                     "scale_factor_max": round(math.exp(max(logs)), 3),
                     "first_conv_scale_factor": round(float(acad[first][0] / ref["academic"][first][0]), 3),
                     "first_bn_input_kurtosis": round(_kurtosis(torch.cat(first_in)), 2),
                     "pixel_std": round(float(x.std(dim=(0, 2, 3)).mean()), 3), "tvm_scales_moved": flips})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet20_cifar")
    ap.add_argument("--sections", default="cost,balance,w8a8,recon")
    ap.add_argument("--generators", default="zeroq,bns-ce,fdda")
    ap.add_argument("--recon-generators", default="bns-ce", help="synthetic sets the reconstruction rows use")
    ap.add_argument("--iters", type=int, default=None, help="reconstruction iterations (default: the CPU preset)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=N, help="images per generated set")
    ap.add_argument("--no-recon-noise", dest="recon_noise", action="store_false",
                    help="leave out the noise rows of the reconstruction section (already measured)")
    ap.add_argument("--recon-real", action="store_true",
                    help="also the real-data reconstruction rows (the same runs as reconstruction.py --rows headline)")
    ap.add_argument("--spread", type=int, default=8, help="real 256-image calibration sets in the spread section")
    ap.add_argument("--synthetic-options", type=json.loads, default={},
                    help='the generators\' options as JSON, e.g. \'{"augment": false}\' (the earlier bns-ce objective)')
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    SYNTHETIC_OPTIONS.update(args.synthetic_options)
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    n = args.n
    gens = args.generators.split(",")
    model = args.model
    cfg = PTQConfig(model=model, weights=str(MODELS[model]), data=DATA)
    ctx = build_context(cfg, progress=False)
    entry = get_entry(model)
    out: dict[str, Any] = {"args": vars(args) | {"out": str(args.out)}}

    if "cost" in sections:  # generation first: the later sections read the cached 1 024-image sets
        rows = []
        for g in gens:  # one 1 024-image run; its first 8 batches cost what a 256-image set costs (for zeroq they
            # are that set; class-targeted generators draw their n targets at once, so their first 256 differ)
            s = make_images(parse_data_source(f"synthetic:{g}:{n}"), ctx.model, entry.input_size, 10, n, 0,
                            "cpu", False, SYNTHETIC_OPTIONS or None, entry.mean, entry.std)
            per_batch = s.info.get("batch_seconds", [])
            before = s.generation_seconds - sum(per_batch)  # fdda's class centres, made before the batches
            first = before + sum(per_batch[:256 // 32])
            rows.append({"generator": g, "seconds_256": round(first, 1), f"seconds_{n}": round(s.generation_seconds, 1),
                         "cached": s.cached, "final_loss": s.loss_curve[-1] if s.loss_curve else None,
                         "real_images": s.real_images})
            print(rows[-1], flush=True)
        out["cost"] = rows
        print_table(f"Generation cost ({model}, 500 iterations per batch of 32, 1 thread)",
                    list(rows[0]), [list(r.values()) for r in rows])

    if "balance" in sections:
        rows = []
        for g in gens:
            s = make_images(parse_data_source(f"synthetic:{g}:{n}"), ctx.model, entry.input_size, 10, n, 0, "cpu",
                            False, SYNTHETIC_OPTIONS or None, entry.mean, entry.std)
            with torch.no_grad():
                pred = torch.cat([ctx.model(s.images[i:i + 256]).argmax(1) for i in range(0, n, 256)])
            counts = torch.bincount(pred, minlength=10).tolist()
            dev = max(abs(c - n / 10) / (n / 10) for c in counts)
            rows.append({"generator": g, "counts": counts, "max_deviation_from_uniform": round(dev, 3)})
        out["balance"] = rows
        print_table(f"Float model's predicted classes on {n} synthetic images", list(rows[0]),
                    [[str(v) for v in r.values()] for r in rows])

    if "w8a8" in sections:
        rows = [run(ctx, model, b, 8, 8, src) for b in BACKENDS for src in sources(gens, n)]
        out["w8a8"] = rows
        print_table("W8A8, 256 calibration images per source", list(rows[0]), [list(r.values()) for r in rows])

    if "recon" in sections:
        rgens = args.recon_generators.split(",")
        plan = [("academic", 4, 8, "adaround"), ("academic", 4, 4, "qdrop"), ("tensorrt", 4, 4, "qdrop")]
        rows = []
        srcs = [s for s in sources(rgens, n) if (args.recon_real or s != "real")  # real rows: reconstruction.py
                and (args.recon_noise or not s.startswith("noise"))]
        for b, w, a, m in plan:
            for src in srcs:
                rows.append(run(ctx, model, b, w, a, src, m, args.iters))
                print(rows[-1], flush=True)
        out["recon"] = rows
        print_table("Reconstruction on 1 024 images per source", list(rows[0]), [list(r.values()) for r in rows])

    if "stats" in sections:
        rows = stats_rows(ctx, model, gens, n)
        out["stats"] = rows
        print_table("256 images of each source against 256 real ones", list(rows[0]),
                    [[str(v) for v in r.values()] for r in rows])

    if "spread" in sections:
        rows = spread_rows(ctx, model, gens, args.spread, n)
        out["spread"] = rows
        print_table("W8A8 top-1 over disjoint 256-image calibration sets per source", list(rows[0])[:-2],
                    [list(r.values())[:-2] for r in rows])

    write_json("data_free", out, args.out)


if __name__ == "__main__":
    main()
