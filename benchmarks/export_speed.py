"""Our exported int8 model vs ONNX Runtime's own ``quantize_static`` output, side by side in one run.

For each activation type -- uint8 (our ``onnxruntime`` backend vs quantize_static QUInt8 activations) and
int8 (our ``tensorrt`` backend vs quantize_static QInt8 symmetric activations) -- both models get int8
symmetric per-channel weights and are calibrated with MinMax on the same images. Latency is measured in
alternating rounds (ours, theirs, ours, ...) so machine load hits both alike; top-1 of each on the test
set is reported too. Goal: ratio = their latency / ours >= 1.0; the ratio is the median of the per-round
ratios (each round times both models back to back), with a bootstrap 95 % interval of that median.

    python benchmarks/export_speed.py [--model resnet20_cifar] [--batch-sizes 1,8] [--repeats 50]
        [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import CIFAR, RESNET20, print_table, write_json
from quantbench.config import PTQConfig
from quantbench.deploy import export_onnx
from quantbench.deploy.export import export_float_onnx
from quantbench.deploy.ort import make_session
from quantbench.deploy.pipeline import calibrated_model

ACT_TYPES = {"u8": ("onnxruntime", "QUInt8", False), "s8": ("tensorrt", "QInt8", True)}


def quantize_static_model(float_path: Path, calib: np.ndarray, act: str, symmetric: bool, out: Path) -> Path:
    """ONNX Runtime's own QDQ quantization: per-channel int8 weights, MinMax calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calib[i:i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, act), weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True})
    return out


def top1(path: Path, xs: np.ndarray, ys: np.ndarray) -> float:
    sess = make_session(path)
    preds = np.concatenate([sess.run(None, {"input": xs[i:i + 256]})[0].argmax(1) for i in range(0, len(xs), 256)])
    return float(100.0 * (preds == ys).mean())


def interleaved_times(paths: dict[str, Path], x: np.ndarray, repeats: int, warmup: int, threads: int | None
                      ) -> dict[str, np.ndarray]:
    """Seconds per run of each model, the models timed in alternating order each round (paired rounds)."""
    sessions = {k: make_session(p, threads=threads) for k, p in paths.items()}
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(warmup):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    order = list(sessions)
    for r in range(repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return {k: np.asarray(v) for k, v in times.items()}


def paired_ratio(theirs: np.ndarray, ours: np.ndarray, resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float, float]:
    """Median of the per-round ratios theirs / ours and a bootstrap 95 % interval of that median."""
    ratios = theirs / ours
    rng = np.random.default_rng(seed)
    boot = np.median(rng.choice(ratios, (resamples, len(ratios)), replace=True), axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(ratios)), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20_cifar")
    ap.add_argument("--weights", default=str(RESNET20))
    ap.add_argument("--data", default=f"cifar10:{CIFAR}")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    batches = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="export-speed-"))
    results, rows = [], []
    for act, (backend, qtype, symmetric) in ACT_TYPES.items():
        cfg = PTQConfig(model=args.model, weights=args.weights, data=args.data, backend=backend,
                        w_observer="minmax", a_observer="minmax", calib_size=args.calib_size)
        cal = calibrated_model(cfg, progress=False)
        ours = export_onnx(cal.gm, cal.example, work / f"ours_{act}.onnx", artefacts=[]).path
        from quantbench.data import calibration_subset

        calib_set = calibration_subset(cal.bundle, args.calib_size, 0)  # the images our model was calibrated on
        calib = torch.stack([calib_set[i][0] for i in range(len(calib_set))])
        from quantbench.models import build_model

        fp = export_float_onnx(build_model(args.model, args.weights), cal.example, work / "float.onnx")
        theirs = quantize_static_model(fp, calib.numpy(), qtype, symmetric, work / f"ort_{act}.onnx")
        xs = torch.stack([cal.bundle.test[i][0] for i in range(len(cal.bundle.test))]).numpy()
        ys = np.array([cal.bundle.test[i][1] for i in range(len(cal.bundle.test))])
        acc = {"ours": top1(ours, xs, ys), "quantize_static": top1(theirs, xs, ys), "fp32": top1(fp, xs, ys)}
        for b in batches:
            x = np.ascontiguousarray(np.resize(xs, (b, *xs.shape[1:])))
            t = interleaved_times({"ours": ours, "quantize_static": theirs, "fp32": fp}, x, args.repeats,
                                  args.warmup, args.threads)
            ms = {k: 1000.0 * float(np.median(v)) for k, v in t.items()}
            ratio, lo, hi = paired_ratio(t["quantize_static"], t["ours"])
            results.append({"activation": act, "backend": backend, "batch": b, "ours_ms": ms["ours"],
                            "quantize_static_ms": ms["quantize_static"], "fp32_ms": ms["fp32"], "ratio": ratio,
                            "ratio_ci95": [lo, hi], "top1": acc})
            rows.append([act, f"{backend} / {qtype}", b, ms["ours"], ms["quantize_static"], ms["fp32"],
                         f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]",
                         f"{acc['ours']:.2f} / {acc['quantize_static']:.2f} / {acc['fp32']:.2f}"])
    print_table(f"{args.model}: our QDQ export vs ONNX Runtime quantize_static (ms, median of {args.repeats}, "
                f"{args.threads} thread(s))",
                ["act.", "ours / quantize_static", "batch", "ours ms", "quantize_static ms", "ORT FP32 ms",
                 "ratio theirs/ours [95 % CI]", "top-1 ours / theirs / fp32"], rows)
    path = write_json("export_speed", {"model": args.model, "threads": args.threads, "repeats": args.repeats,
                                       "results": results}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
