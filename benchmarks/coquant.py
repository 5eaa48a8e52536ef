"""CoQuant (seed 002) at CPU scale: pretrained ResNet-20, the shared CIFAR-10 subset, B = {8, 4, 2}, a few epochs.

Three rows per bit-width:

* CoQuant: dynamic teacher selection and Swap.
* Any-Precision-style recursive distillation: each bit-width learns from the next higher one, with switchable BN
  and no swap.
* PACT trained separately at each bit-width of B, each for the same number of epochs.

Bit-widths outside B are evaluated zero-shot after BN calibration on 256 images (seed 002 Table 3). The seed trains
ResNet-18 for 350 epochs from scratch on all of CIFAR-10; this is the scaled protocol. Torch uses one thread.

``--ablations`` runs seed 002's ablations instead (acceptance 3), each a CoQuant run changed in one respect:
B = {8, 4} (Table 4: without the lowest precision, its zero-shot collapses), lambda 0 and 1 (0.001 is the main
row), and Swap off (p1 = 1: every block at the student's bit-width).

    python benchmarks/coquant.py [--epochs 3] [--bits 8,4,2] [--no-baselines] [--ablations]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from _common import CIFAR, RESNET20, print_table, write_json
from quantbench.coquant.config import CoQuantConfig
from quantbench.coquant.pipeline import run_coquant
from quantbench.qat.config import QATConfig
from quantbench.qat.pipeline import run_qat

OUT = "benchmarks/qat-out/coquant"  # + the --name suffix below


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": "resnet20_cifar", "weights": str(RESNET20), "data": f"cifar10:{CIFAR}", "backend": "academic",
            "epochs": args.epochs, "batch_size": 128, "seed": 0, "log_every": 10, "max_test": args.max_test,
            "lr": args.lr, "warmup_epochs": args.warmup_epochs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--bits", default="8,4,2")
    p.add_argument("--eval-bits", default="8,7,6,5,4,3,2")
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--bn-recalibrate", action="store_true", help="re-estimate trained bits' BN before evaluating")
    p.add_argument("--no-bn-init", action="store_true", help="no BN re-estimation before training (all rows)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: QAT's ResNet rate, 0.004)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up epochs")
    p.add_argument("--name", default="coquant", help="JSON name under benchmarks/results/")
    p.add_argument("--ramp-epochs", type=float, default=0.0, help="ramp the lower bits' losses in (a deviation)")
    p.add_argument("--ablations", action="store_true", help="run the ablation rows instead of the main ones")
    p.add_argument("--zero-shot-ranges", default="linear", choices=["linear", "nearest"])
    p.add_argument("--no-bn-calib-augment", action="store_true", help="calibrate BN on un-augmented images")
    args = p.parse_args()
    torch.set_num_threads(1)
    bits = [int(b) for b in args.bits.split(",")]
    eval_bits = [int(b) for b in args.eval_bits.split(",")]
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    runs: dict[str, dict[str, Any]] = {"coquant": {}} if not args.ablations else {
        "B={8,4}": {"bits": [8, 4]}, "lambda=0": {"lam": 0.0}, "lambda=1": {"lam": 1.0}, "no swap": {"p1": 1.0}}
    if not args.no_baselines and not args.ablations:
        runs["recursive"] = {"teacher": "recursive"}
    fp = 0.0
    for name, change in runs.items():
        slug = "".join(c if c.isalnum() else "-" for c in name)
        cfg = CoQuantConfig(**{**_common(args), "bits": bits, "eval_bits": eval_bits,
                               "bn_recalibrate": args.bn_recalibrate, "bn_init": not args.no_bn_init,
                               "ramp_epochs": args.ramp_epochs, "zero_shot_ranges": args.zero_shot_ranges,
                               "bn_calib_augment": not args.no_bn_calib_augment,
                               "out_dir": f"{OUT}/{args.name}-{slug}", **change})
        t0 = time.perf_counter()
        r = run_coquant(cfg, progress=False, overwrite=True)
        seconds[name] = time.perf_counter() - t0
        fp = r.fp_top1
        rows[name] = {e.bits: {"top1": e.quant_top1, "agreement": e.agreement, "zero_shot": e.zero_shot}
                      for e in r.results}
    if not args.no_baselines and not args.ablations:
        rows["pact"] = {}
        seconds["pact"] = 0.0
        for b in bits:
            cfg = QATConfig(**_common(args), algorithm="pact", bn_fold=0, w_bits=b, a_bits=b,
                            bn_init=not args.no_bn_init, out_dir=f"{OUT}/{args.name}-pact{b}")
            t0 = time.perf_counter()
            q = run_qat(cfg, progress=False, overwrite=True)
            seconds["pact"] += time.perf_counter() - t0
            rows["pact"][b] = {"top1": q.quant_top1, "agreement": q.agreement, "zero_shot": False}
    names = list(rows)
    table = []
    for b in eval_bits:
        line: list[Any] = [b]
        for n in names:
            e = rows[n].get(b)
            line.append("-" if e is None else f"{e['top1']:.2f} / {100 * e['agreement']:.1f}"
                        + (" (zero-shot)" if e["zero_shot"] else ""))
        table.append(line)
    print_table(f"ResNet-20 CIFAR-10 subset, B = {bits}, {args.epochs} epochs; FP32 {fp:.2f}; top-1 / agreement %",
                ["bits", *names], table)
    print("seconds:", {k: round(v, 1) for k, v in seconds.items()})
    print("wrote", write_json(args.name, {"fp_top1": fp, "bits": bits, "epochs": args.epochs, "rows": rows,
                                           "seconds": seconds, "args": vars(args)}))


if __name__ == "__main__":
    main()
