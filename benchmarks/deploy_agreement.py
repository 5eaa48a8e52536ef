"""Simulation vs ONNX Runtime int8 on the shared ResNet-20 for every deployable backend.

Each backend is calibrated as ``quantbench ptq`` and ``quantbench export`` do by default (mse weights and
activations, 256 images), exported, and run on the 932 CIFAR-10 test images in ONNX Runtime's CPU provider
in three ways: full 8-bit weights in the default session, full 8-bit weights with ``session.x64quantprecision=1``, and
7-bit weights (``--reduce-range``) in the default session.

    python benchmarks/deploy_agreement.py [--backends onnxruntime,fbgemm,...] [--a-observer mse] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import CIFAR, RESNET20, print_table, write_json
from quantbench.backends import backend_names, load_backend
from quantbench.config import PTQConfig
from quantbench.data import make_loader
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.pipeline import calibrated_model
from quantbench.utils.progress import track

MODES = (("full 8-bit, default session", False, False), ("full 8-bit, x64quantprecision", False, True),
         ("7-bit (reduce_range), default session", True, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    deployable = [b for b in backend_names() if load_backend(b).deployable]
    ap.add_argument("--backends", default=",".join(deployable))
    ap.add_argument("--w-observer", default=PTQConfig.model_fields["w_observer"].default)
    ap.add_argument("--a-observer", default=PTQConfig.model_fields["a_observer"].default)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deploy-agreement-"))
    results, rows = [], []
    t0 = time.perf_counter()
    jobs = [(b, m) for b in args.backends.split(",") for m in MODES]
    calibrated = {}
    for backend, (label, rr, x64) in track(jobs, "export + verify", len(jobs)):
        if (backend, rr) not in calibrated:
            cfg = PTQConfig(model="resnet20_cifar", weights=str(RESNET20), data=f"cifar10:{CIFAR}", backend=backend,
                            w_observer=args.w_observer, a_observer=args.a_observer)
            cal = calibrated_model(cfg, rr, progress=False)
            path = export_onnx(cal.gm, cal.example, work / f"{backend}_{int(rr)}.onnx", artefacts=[]).path
            calibrated[(backend, rr)] = (cal, path)
        cal, path = calibrated[(backend, rr)]
        r = verify_onnx(path, cal.gm, make_loader(cal.bundle.test, 512), x64_quant_precision=x64, progress=False)
        results.append({"backend": backend, "mode": label, "reduce_range": rr, "x64_quant_precision": x64,
                        **{k: v for k, v in r.to_dict().items() if k not in ("cpu", "int16_overflow_risk", "onnx")}})
        rows.append([backend, label, f"{r.sim_top1:.2f}", f"{r.real_top1:.2f}", f"{r.real_top1 - r.sim_top1:+.2f}",
                     f"{100 * r.agreement:.2f}", f"{r.max_abs_logit_diff:.3g}",
                     ", ".join(f"{k}x{v}" for k, v in r.int8_kernels.items()),
                     ", ".join(sorted({f["op"] for f in r.float_ops})) or "-"])
    print_table("ResNet-20 / CIFAR-10 (932 images): simulation vs ONNX Runtime int8",
                ["backend", "weights, ORT session", "sim top-1", "ORT top-1", "Δ", "agree %", "max |Δ logit|",
                 "int8 kernels", "float ops"], rows)
    path = write_json("deploy_agreement", {"w_observer": args.w_observer, "a_observer": args.a_observer,
                                           "results": results, "wall_seconds": time.perf_counter() - t0}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
