"""Full-model calibration time of ResNet-20 on 256 CIFAR-10 images, every observer, vs MinMax.

Also times PyTorch's own FX PTQ with HistogramObserver (and MinMax) and ONNX Runtime's
quantize_static with its Entropy (and MinMax) calibrator, in the same run.

    python benchmarks/calibration.py [--repeats 3] [--backend tensorrt] [--out FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import CIFAR, RESNET20, median_time, print_table, write_json
from quantbench.backends import load_backend
from quantbench.data import calibration_subset, load_data, make_loader
from quantbench.graph.quantize import prepare
from quantbench.models import build_model, get_entry
from quantbench.observers import OBSERVERS
from quantbench.ptq import calibrate


def _calib_batches(n: int = 256, batch: int = 64) -> list[torch.Tensor]:
    e = get_entry("resnet20_cifar")
    bundle = load_data(f"cifar10:{CIFAR}", e.mean, e.std, e.input_size)
    return [x for x, _ in make_loader(calibration_subset(bundle, n), batch)]


def time_quantbench(model, batches, backend: str, w_observer: str, a_observer: str, repeats: int) -> float:
    spec = load_backend(backend)
    loader = [(x, None) for x in batches]

    def run() -> None:
        gm = prepare(model, spec, batches[0][:1], w_observer, a_observer)
        calibrate(gm, loader, progress=False)

    # prepare() (tracing) is not calibration: time it alone and subtract
    def prep() -> None:
        prepare(model, spec, batches[0][:1], w_observer, a_observer)

    return max(median_time(run, repeats) - median_time(prep, repeats), 0.0)


def time_torch_fx(model, batches, observer: str, repeats: int) -> float:
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        PerChannelMinMaxObserver,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    act = HistogramObserver if observer == "histogram" else MinMaxObserver
    qconfig = QConfig(activation=act.with_args(reduce_range=True),
                      weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    mapping = QConfigMapping().set_global(qconfig)

    def prep():
        return prepare_fx(model, mapping, example_inputs=(batches[0][:1],))

    def run() -> None:
        m = prep()
        with torch.no_grad():
            for x in batches:
                m(x)
        convert_fx(m)

    return max(median_time(run, repeats) - median_time(prep, repeats), 0.0)


def time_ort(model, batches, method: str, repeats: int) -> float | None:
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError:
        return None
    tmp = Path(tempfile.mkdtemp())
    fp = tmp / "fp.onnx"
    torch.onnx.export(model, (batches[0][:1],), str(fp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"input": x.numpy()} for x in batches])

        def get_next(self):
            return next(self.it, None)

    def run() -> None:
        quantize_static(str(fp), str(tmp / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))

    return median_time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="tensorrt")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet20_cifar", str(RESNET20))
    batches = _calib_batches()
    t_start = time.perf_counter()
    rows, records = [], []
    base = time_quantbench(model, batches, args.backend, "minmax", "minmax", args.repeats)
    for obs in OBSERVERS.names():
        t_act = base if obs == "minmax" else time_quantbench(model, batches, args.backend, "minmax", obs, args.repeats)
        t_both = base if obs == "minmax" else time_quantbench(model, batches, args.backend, obs, obs, args.repeats)
        records.append({"tool": "quantbench", "observer": obs, "seconds": t_act, "ratio_to_minmax": t_act / base,
                        "seconds_weights_too": t_both, "ratio_weights_too": t_both / base})
    for obs in ("minmax", "histogram"):
        t = time_torch_fx(model, batches, obs, args.repeats)
        records.append({"tool": "torch.ao FX", "observer": obs, "seconds": t, "ratio_to_minmax": t / base})
    for method in ("MinMax", "Entropy"):
        t = time_ort(model, batches, method, args.repeats)
        if t is not None:
            records.append({"tool": "onnxruntime", "observer": method, "seconds": t, "ratio_to_minmax": t / base})
    for r in records:
        both = (f"{r['seconds_weights_too']:.3f} s ({r['ratio_weights_too']:.2f}x)"
                if "seconds_weights_too" in r else "-")
        rows.append([r["tool"], r["observer"], f"{r['seconds']:.3f} s ({r['ratio_to_minmax']:.2f}x)", both])
    print_table(f"Calibration of ResNet-20 on 256 CIFAR-10 images ({args.backend} placement, median of "
                f"{args.repeats}); ratio to quantbench minmax",
                ["tool", "calibrator", "activations (weights minmax)", "weights and activations"], rows)
    path = write_json("calibration", {"backend": args.backend, "n_images": 256, "repeats": args.repeats,
                                      "results": records, "wall_seconds": time.perf_counter() - t_start}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
