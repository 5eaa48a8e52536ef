"""Acceptance 2 of issue 3: LSQ W4A4 QAT of the pretrained CIFAR ResNet-20 on the 4829 training images of
../shared for 3 epochs on CPU; records top-1 on the 932 test images (goal >= 88 %, FP32 91.63 %) and the time.

The same run from the command line:

    quantbench qat --config examples/qat_resnet20_lsq_w4a4.yaml --out qat-out/resnet20/result.json

    python benchmarks/qat_resnet20.py [--epochs 3] [--threads 1] [--algorithm lsq] [--backend academic]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import CIFAR, RESNET20, print_table, write_json
from quantbench.qat.config import load_qat_config
from quantbench.qat.pipeline import run_qat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", default="lsq")
    ap.add_argument("--backend", default="academic")
    ap.add_argument("--bits", default="W4A4", help="e.g. W4A4")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None, help="default: the ResNet family's 0.004")
    ap.add_argument("--w-observer", default="mse")
    ap.add_argument("--a-observer", default="mse")
    ap.add_argument("--bn-fold", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--out-dir", default="qat-out/bench-resnet20")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w_bits, a_bits = (int(v) for v in args.bits.upper().lstrip("W").split("A"))
    cfg = load_qat_config(None, {
        "model": "resnet20_cifar", "weights": str(RESNET20), "data": f"cifar10:{CIFAR}", "backend": args.backend,
        "w_bits": w_bits, "a_bits": a_bits, "algorithm": args.algorithm, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "w_observer": args.w_observer, "a_observer": args.a_observer,
        "bn_fold": args.bn_fold, "log_every": 25, "out_dir": args.out_dir,
    })
    t0 = time.perf_counter()
    r = run_qat(cfg, progress=False, overwrite=True)  # a re-run of the benchmark replaces the previous one
    wall = time.perf_counter() - t0
    print_table(f"QAT ResNet-20 {args.algorithm} {args.bits} {r.backend}, {args.epochs} epochs, "
                f"{torch.get_num_threads()} thread(s)",
                ["FP32 top-1", "PTQ init top-1", "QAT top-1", "agreement", "train s", "wall s", "goal >= 88 %"],
                [[r.fp_top1, r.init_top1, r.quant_top1, r.agreement, r.train_seconds, wall,
                  "met" if r.quant_top1 >= 88.0 else "MISSED"]])
    path = write_json(f"qat_resnet20_{args.algorithm}_{args.bits.lower()}",
                      {"args": vars(args) | {"out": str(args.out)}, "result": r.to_dict(), "wall_seconds": wall,
                       "config": cfg.model_dump(mode="json")}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
