"""Simulation vs every real runtime installed here, per deployable backend spec (issue 16's table).

ResNet-20 (shared weights) on the 932 CIFAR-10 test images: each backend is calibrated as ``quantbench export``
does by default (mse weights and activations, 256 images), exported once, and run in every runtime of
:data:`quantbench.deploy.runtimes.DEPLOY_RUNTIMES` that is installed (ONNX Runtime with
``session.x64quantprecision=1``, its exact u8u8 kernels). Columns: argmax agreement, top-1 of both, max |Δ logit|,
the integer ops the runtime ran (convolutions in int8 out of 19), and the latency of the int8 model against that
runtime's own FP32 (batch 32, one thread). With ``--mobilenet``, the same on MobileNetV2 (random weights,
64x64 random inputs) for the op coverage.

    python benchmarks/runtime_agreement.py [--backends openvino,onnxruntime] [--runtimes openvino] [--mobilenet]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import CIFAR, RESNET20, print_table, write_json
from quantbench.backends import backend_names, load_backend
from quantbench.config import PTQConfig
from quantbench.data import make_loader
from quantbench.deploy import export_onnx, verify_onnx
from quantbench.deploy.export import export_float_onnx
from quantbench.deploy.latency import median_ms
from quantbench.deploy.pipeline import calibrated_model
from quantbench.deploy.runtimes import DEPLOY_RUNTIMES, RuntimeOptions, get_runtime
from quantbench.graph.quantize import prepare
from quantbench.models import build_model
from quantbench.ptq.calibrate import calibrate


def latency_ms(runtime: str, path: Path, x: np.ndarray, repeats: int) -> float:
    loaded = get_runtime(runtime).load(path, RuntimeOptions(threads=1))
    return median_ms(lambda: loaded.run(x), repeats, 3)


def row(runtime: str, backend: str, r: Any, int8_ms: float, fp32_ms: float, convs: int) -> dict[str, Any]:
    ints = r.int8_kernels
    conv_int = sum(ints.get(k, 0) for k in ("QLinearConv", "Convolution", "GroupConvolution", "Conv", "convolution"))
    return {"runtime": runtime, "backend": backend, "agreement_%": round(100 * r.agreement, 2),
            "sim_top1": None if r.sim_top1 is None else round(r.sim_top1, 2),
            "real_top1": None if r.real_top1 is None else round(r.real_top1, 2),
            "delta_top1": None if r.sim_top1 is None else round(r.real_top1 - r.sim_top1, 2),
            "max_abs_logit": round(r.max_abs_logit_diff, 4), "int8_convs": f"{conv_int}/{convs}",
            "float_ops": ",".join(sorted({f["op"] for f in r.float_ops})) or "-",
            "int8_ms": round(int8_ms, 3), "fp32_ms": round(fp32_ms, 3), "speedup": round(fp32_ms / int8_ms, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    deployable = [b for b in backend_names() if load_backend(b).deployable]
    installed = [n for n in DEPLOY_RUNTIMES.names() if get_runtime(n).missing() is None]
    ap.add_argument("--backends", default=",".join(deployable))
    ap.add_argument("--runtimes", default=",".join(installed))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--mobilenet", action="store_true", help="also MobileNetV2 (random weights) for op coverage")
    ap.add_argument("--no-resnet", dest="resnet", action="store_false", help="leave out the ResNet-20 rows")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    runtimes, backends = args.runtimes.split(","), args.backends.split(",")
    work = Path(tempfile.mkdtemp(prefix="runtime-agreement-"))
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {"resnet20": [], "mobilenet_v2": []}
    fp32: dict[tuple[str, str], float] = {}
    for backend in backends if args.resnet else []:
        cfg = PTQConfig(model="resnet20_cifar", weights=str(RESNET20), data=f"cifar10:{CIFAR}", backend=backend)
        cal = calibrated_model(cfg, progress=False)
        path = export_onnx(cal.gm, cal.example, work / f"r20_{backend}.onnx", artefacts=[]).path
        x = np.ascontiguousarray(torch.stack([cal.bundle.test[i][0] for i in range(32)]).numpy())
        fpath = work / "r20_float.onnx"
        if not fpath.exists():
            export_float_onnx(build_model("resnet20_cifar", str(RESNET20)), cal.example, fpath)
        for rt in runtimes:
            r = verify_onnx(path, cal.gm, make_loader(cal.bundle.test, 1024), x64_quant_precision=True,
                            progress=False, runtime=rt)
            if (rt, "r20") not in fp32:
                fp32[(rt, "r20")] = latency_ms(rt, fpath, x, args.repeats)
            results["resnet20"].append(row(rt, backend, r, latency_ms(rt, path, x, args.repeats), fp32[(rt, "r20")],
                                           19))
            print(results["resnet20"][-1], flush=True)
    if args.mobilenet:
        torch.manual_seed(0)
        net = build_model("mobilenet_v2", num_classes=10).eval()
        images = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        fpath = export_float_onnx(net, images[:1], work / "mnv2_float.onnx")
        for backend in backends:
            gm = prepare(net, load_backend(backend), images[:1], "mse", "mse")
            calibrate(gm, [(images, None)], progress=False)
            path = export_onnx(gm, images[:1], work / f"mnv2_{backend}.onnx", artefacts=[]).path
            x = np.ascontiguousarray(images[:32].numpy())
            for rt in runtimes:
                r = verify_onnx(path, gm, [images], x64_quant_precision=True, progress=False, runtime=rt)
                if (rt, "mnv2") not in fp32:
                    fp32[(rt, "mnv2")] = latency_ms(rt, fpath, x, args.repeats)
                results["mobilenet_v2"].append(row(rt, backend, r, latency_ms(rt, path, x, args.repeats),
                                                   fp32[(rt, "mnv2")], 52))
                print(results["mobilenet_v2"][-1], flush=True)
    for name, rows in results.items():
        if rows:
            print_table(f"{name}: simulation vs real runtimes (W8A8)", list(rows[0]), [list(r.values()) for r in rows])
    out = write_json("runtime_agreement", {"results": results, "wall_seconds": round(time.perf_counter() - t0, 1)},
                     args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
