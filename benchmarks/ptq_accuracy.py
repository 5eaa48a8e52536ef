"""ResNet-20 PTQ accuracy on the CIFAR-10 subset: every backend x calibrator x W8A8 / W4A8 / W4A4.

As in seed 001 Table 10 the calibrator varies for activations, with one weight calibrator (``--w-observer``,
default ``mse``, quantbench's default); ``--w-observer same`` uses each calibrator for the weights too.
Prints top-1 and agreement tables and writes JSON.

    python benchmarks/ptq_accuracy.py [--observers minmax,mse,...] [--w-observer mse|same|NAME] [--bn-calib]
        [--no-bn-calib-augment] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import CIFAR, RESNET20, print_table, write_json
from quantbench.backends import backend_names
from quantbench.config import PTQConfig
from quantbench.observers import OBSERVERS
from quantbench.ptq.pipeline import build_context, run_ptq
from quantbench.utils.progress import track

BITS = ((8, 8), (4, 8), (4, 4))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--observers", default="minmax,quantile,mse,kld,norm,meanstd")
    ap.add_argument("--backends", default=",".join(backend_names()))
    ap.add_argument("--w-observer", default="mse", help="weight calibrator, or 'same' as the activations'")
    ap.add_argument("--bn-calib", action="store_true")
    ap.add_argument("--no-bn-calib-augment", action="store_true",
                    help="BN re-calibration on the un-augmented calibration images")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    observers = args.observers.split(",")
    for name in [*observers, *([] if args.w_observer == "same" else [args.w_observer])]:
        OBSERVERS.get(name)  # an unknown name fails here, listing the valid ones
    backends = args.backends.split(",")
    base = PTQConfig(model="resnet20_cifar", weights=str(RESNET20), data=f"cifar10:{CIFAR}", bn_calib=args.bn_calib,
                     bn_calib_augment=not args.no_bn_calib_augment)
    ctx = build_context(base, progress=False)
    jobs = [(b, w, a, o) for b in backends for (w, a) in BITS for o in observers]
    t0 = time.perf_counter()
    results = []
    for b, w, a, o in track(jobs, "PTQ accuracy sweep", len(jobs)):
        w_obs = o if args.w_observer == "same" else args.w_observer
        cfg = base.model_copy(update=dict(backend=b, w_bits=w, a_bits=a, w_observer=w_obs, a_observer=o))
        results.append(run_ptq(cfg, progress=False, context=ctx).to_dict())
    fp = results[0]["fp_top1"]
    for metric, fmt in (("quant_top1", "{:.2f}"), ("agreement", "{:.1%}")):
        rows = []
        for b in backends:
            for w, a in BITS:
                row = [b, f"W{w}A{a}"]
                for o in observers:
                    r = next(r for r in results if (r["backend"], r["w_bits"], r["a_bits"], r["a_observer"]) ==
                             (b, w, a, o))
                    row.append(fmt.format(r[metric]))
                rows.append(row)
        print_table(f"ResNet-20 {metric} by activation calibrator (weights: {args.w_observer}; FP32 {fp:.2f} %, "
                    "932 test images, 256 calibration images"
                    f"{', BN re-calibration' if args.bn_calib else ''})", ["backend", "bits", *observers], rows)
    path = write_json("ptq_accuracy_bncalib" if args.bn_calib else "ptq_accuracy",
                      {"fp_top1": fp, "w_observer": args.w_observer, "results": results,
                       "wall_seconds": time.perf_counter() - t0}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
