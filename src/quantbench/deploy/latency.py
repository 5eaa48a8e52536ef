"""Latency of one model on every runtime this machine has (seed 001 B.3, Table 9).

Each runtime is an entry in :data:`RUNTIMES` with the runtime it is compared against (the speed-up in
brackets, like Table 9's ratio to the former row). Median wall time over ``repeats`` runs after
``warmup`` runs, per batch size. int8 runtimes are calibrated on ``calib`` images (random inputs when no
data is given: speed does not depend on the calibration).
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quantbench.utils.io import atomic_write
from quantbench.utils.progress import track
from quantbench.utils.registry import Registry

Runner = Callable[[], Any]


@dataclass
class LatencyContext:
    """What the runtimes share: the float model, calibration images and a scratch folder."""

    model: nn.Module
    input_size: tuple[int, ...]
    calib: torch.Tensor
    workdir: Path
    threads: int | None = None
    a_observer: str = "minmax"
    owns_workdir: bool = False  # a temp folder made by :func:`make_context`, removed by :meth:`close`
    _cache: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def close(self) -> None:
        """Drop the cached models and sessions and remove the scratch folder if this context made it."""
        self._cache.clear()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LatencyContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def torch_settings(threads: int | None) -> Iterator[None]:
    """Set PyTorch's thread count for the measurement; restore it and the quantized engine afterwards."""
    old_threads, old_engine = torch.get_num_threads(), torch.backends.quantized.engine
    try:
        if threads:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.quantized.engine = old_engine


@dataclass(frozen=True)
class Runtime:
    """One way to run the model: ``available(ctx)`` returns None or why not; ``build(ctx, x)`` a runner."""

    name: str
    label: str
    baseline: str | None
    available: Callable[[LatencyContext], str | None]
    build: Callable[[LatencyContext, torch.Tensor], Runner]


RUNTIMES: Registry[Runtime] = Registry("runtime")


def _always(ctx: LatencyContext) -> str | None:
    return None


def _need_cuda(ctx: LatencyContext) -> str | None:
    return None if torch.cuda.is_available() else "no CUDA GPU"


def _torch_runner(model: nn.Module, x: torch.Tensor, cuda: bool = False) -> Runner:
    def run() -> Any:
        with torch.inference_mode():
            out = model(x)
        if cuda:
            torch.cuda.synchronize()
        return out
    return run


def _torch_fp32(ctx: LatencyContext, x: torch.Tensor) -> Runner:
    return _torch_runner(ctx.model.eval(), x)


def _torch_gpu(dtype: torch.dtype) -> Callable[[LatencyContext, torch.Tensor], Runner]:
    def build(ctx: LatencyContext, x: torch.Tensor) -> Runner:
        import copy

        m = ctx.cached(f"gpu-{dtype}", lambda: copy.deepcopy(ctx.model).eval().to("cuda", dtype))
        return _torch_runner(m, x.to("cuda", dtype), cuda=True)
    return build


def _x86_available(ctx: LatencyContext) -> str | None:
    if "x86" not in torch.backends.quantized.supported_engines:
        return "PyTorch was built without the x86 quantized engine"
    try:
        _torch_int8_model(ctx)
    except Exception as exc:  # FX tracing / quantization failures mean "does not apply to this model"
        return f"PyTorch FX int8 does not apply to this model: {type(exc).__name__}: {str(exc)[:120]}"
    return None


def _torch_int8_model(ctx: LatencyContext) -> nn.Module:
    def make() -> nn.Module:
        import copy

        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            m = prepare_fx(copy.deepcopy(ctx.model).eval(), get_default_qconfig_mapping("x86"), (ctx.calib[:1],))
            with torch.no_grad():
                m(ctx.calib)
            return convert_fx(m)
    return ctx.cached("torch-int8", make)


def _torch_int8(ctx: LatencyContext, x: torch.Tensor) -> Runner:
    return _torch_runner(_torch_int8_model(ctx), x)


def _float_onnx(ctx: LatencyContext) -> Path:
    from quantbench.deploy.export import export_float_onnx

    return ctx.cached("float-onnx", lambda: export_float_onnx(ctx.model, ctx.calib[:1], ctx.workdir / "float.onnx"))


def qdq_onnx(ctx: LatencyContext, backend: str) -> Path:
    """The model calibrated on ``ctx.calib`` for ``backend`` and exported as QDQ ONNX (cached)."""
    def make() -> Path:
        from quantbench.backends import load_backend
        from quantbench.deploy.export import export_onnx
        from quantbench.graph.quantize import prepare
        from quantbench.ptq import calibrate

        gm = prepare(ctx.model, load_backend(backend), ctx.calib[:1], "minmax", ctx.a_observer)
        calibrate(gm, [(ctx.calib, None)], progress=False)
        return export_onnx(gm, ctx.calib[:1], ctx.workdir / f"{backend}.onnx", artefacts=[]).path
    return ctx.cached(f"qdq-{backend}", make)


def _ort_runner(path: Path, x: torch.Tensor, threads: int | None, x64: bool = False) -> Runner:
    from quantbench.deploy.ort import make_session

    sess = make_session(path, x64, threads)
    name = sess.get_inputs()[0].name
    feed = {name: x.numpy()}
    return lambda: sess.run(None, feed)


def _ort_fp32(ctx: LatencyContext, x: torch.Tensor) -> Runner:
    return _ort_runner(_float_onnx(ctx), x, ctx.threads)


def _ort_int8(backend: str, x64: bool = False) -> Callable[[LatencyContext, torch.Tensor], Runner]:
    def build(ctx: LatencyContext, x: torch.Tensor) -> Runner:
        return _ort_runner(qdq_onnx(ctx, backend), x, ctx.threads, x64)
    return build


def _deploy_runtime_missing(name: str) -> Callable[[LatencyContext], str | None]:
    def missing(ctx: LatencyContext) -> str | None:
        from quantbench.deploy.runtimes import get_runtime

        return get_runtime(name).missing()
    return missing


def _deploy_runner(name: str, onnx_path: Callable[[LatencyContext], Path]) -> Callable[[LatencyContext, torch.Tensor],
                                                                                      Runner]:
    """A runner of registered deployment runtime ``name`` on the ONNX file ``onnx_path(ctx)``."""
    def build(ctx: LatencyContext, x: torch.Tensor) -> Runner:
        from quantbench.deploy.runtimes import RuntimeOptions, get_runtime

        loaded = get_runtime(name).load(onnx_path(ctx), RuntimeOptions(threads=ctx.threads))
        feed = np.ascontiguousarray(x.numpy())
        return lambda: loaded.run(feed)
    return build


def _register_deploy_rows(runtime: str, label: str) -> None:
    """``{runtime}-fp32`` (the float export) and ``{runtime}-int8-{onnxruntime,tensorrt}`` (QDQ exports) rows of
    deployment runtime ``runtime``, skipped with its install command when it is missing."""
    missing, prefix = _deploy_runtime_missing(runtime), runtime
    RUNTIMES.add(f"{prefix}-fp32", Runtime(f"{prefix}-fp32", f"{label} FP32", "torch-fp32", missing,
                                           _deploy_runner(runtime, _float_onnx)))
    for backend in ("onnxruntime", "tensorrt"):
        RUNTIMES.add(f"{prefix}-int8-{backend}", Runtime(
            f"{prefix}-int8-{backend}", f"{label} INT8 QDQ ({backend})", f"{prefix}-fp32", missing,
            _deploy_runner(runtime, lambda ctx, b=backend: qdq_onnx(ctx, b))))


def _register_defaults() -> None:
    RUNTIMES.add("torch-fp32", Runtime("torch-fp32", "PyTorch eager FP32", None, _always, _torch_fp32))
    RUNTIMES.add("torch-fp16-gpu", Runtime("torch-fp16-gpu", "PyTorch FP16 (GPU)", None, _need_cuda,
                                           _torch_gpu(torch.float16)))
    RUNTIMES.add("torch-bf16-gpu", Runtime("torch-bf16-gpu", "PyTorch BF16 (GPU)", "torch-fp16-gpu", _need_cuda,
                                           _torch_gpu(torch.bfloat16)))
    RUNTIMES.add("torch-int8-x86", Runtime("torch-int8-x86", "PyTorch INT8 (FX, x86 engine)", "torch-fp32",
                                           _x86_available, _torch_int8))
    RUNTIMES.add("ort-fp32", Runtime("ort-fp32", "ONNX Runtime FP32", "torch-fp32", _always, _ort_fp32))
    for backend, act in (("onnxruntime", "u8"), ("tensorrt", "s8")):
        RUNTIMES.add(f"ort-int8-{backend}", Runtime(
            f"ort-int8-{backend}", f"ONNX Runtime INT8 QDQ ({act} act., {backend})", "ort-fp32", _always,
            _ort_int8(backend)))
    RUNTIMES.add("ort-int8-onnxruntime-x64prec", Runtime(
        "ort-int8-onnxruntime-x64prec", "ONNX Runtime INT8 QDQ (u8 act., x64quantprecision)", "ort-fp32", _always,
        _ort_int8("onnxruntime", x64=True)))
    for runtime, label in (("openvino", "OpenVINO CPU"), ("executorch", "ExecuTorch XNNPACK")):
        _register_deploy_rows(runtime, label)
    RUNTIMES.add("torch-qdq-x86", Runtime(
        "torch-qdq-x86", "PyTorch x86 engine on the QDQ export (x86 spec, interpreted)", "torch-int8-x86",
        _deploy_runtime_missing("torch-x86"), _deploy_runner("torch-x86", lambda ctx: qdq_onnx(ctx, "x86"))))


_register_defaults()
DEFAULT_RUNTIMES = ("torch-fp32", "torch-fp16-gpu", "torch-bf16-gpu", "torch-int8-x86", "ort-fp32",
                    "ort-int8-onnxruntime", "ort-int8-onnxruntime-x64prec", "ort-int8-tensorrt", "openvino-fp32",
                    "openvino-int8-onnxruntime", "openvino-int8-tensorrt", "torch-qdq-x86", "executorch-fp32",
                    "executorch-int8-onnxruntime", "executorch-int8-tensorrt")


def median_ms(run: Runner, repeats: int, warmup: int) -> float:
    """Median wall time of ``run`` in milliseconds after ``warmup`` untimed runs."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


@dataclass
class LatencyRow:
    runtime: str
    label: str
    batch: int
    median_ms: float | None
    baseline: str | None
    speedup: float | None  # baseline latency / this latency
    skipped: str | None = None


@dataclass
class LatencyReport:
    model: str
    input_size: tuple[int, ...]
    threads: int
    repeats: int
    warmup: int
    rows: list[LatencyRow]
    environment: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "input_size": list(self.input_size)}


def measure(ctx: LatencyContext, runtimes: Iterable[str], batches: Iterable[int], repeats: int = 30,
            warmup: int = 5, progress: bool = True, name: str = "") -> LatencyReport:
    """Median latency of every available runtime at every batch size. PyTorch's thread count and quantized
    engine are what they were before when it returns."""
    from quantbench.deploy.hazards import cpu_features
    from quantbench.deploy.ort import ort_version

    chosen = [RUNTIMES.get(r) for r in runtimes]
    results: dict[tuple[str, int], float] = {}
    with torch_settings(ctx.threads):
        threads = ctx.threads or torch.get_num_threads()
        skipped = {rt.name: rt.available(ctx) for rt in chosen}
        jobs = [(b, rt) for b in batches for rt in chosen if skipped[rt.name] is None]
        for b, rt in track(jobs, "timing", len(jobs), progress):
            run = rt.build(ctx, _batch(ctx, b))
            results[(rt.name, b)] = median_ms(run, repeats, warmup)
            del run  # an ORT session's spinning thread pool must not slow down the next runtime
            gc.collect()
    rows = []
    for b in batches:
        for rt in chosen:
            ms = results.get((rt.name, b))
            base = results.get((rt.baseline, b)) if rt.baseline else None
            rows.append(LatencyRow(rt.name, rt.label, b, ms, rt.baseline,
                                   base / ms if (base and ms) else None, skipped[rt.name]))
    env = {"torch": torch.__version__, "onnxruntime": ort_version(), **cpu_features(),
           "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    return LatencyReport(name, ctx.input_size, threads, repeats, warmup, rows, env)


def _batch(ctx: LatencyContext, b: int) -> torch.Tensor:
    reps = -(-b // ctx.calib.shape[0])
    return ctx.calib.repeat(reps, *([1] * (ctx.calib.dim() - 1)))[:b].contiguous()


def make_context(model: nn.Module, input_size: tuple[int, ...], calib: torch.Tensor | None = None,
                 threads: int | None = None, workdir: Path | None = None, a_observer: str = "minmax") -> LatencyContext:
    """A context with ``calib`` images (default: 32 standard-normal images); without ``workdir`` it makes a
    temp folder that ``close()`` (or leaving ``with make_context(...) as ctx``) removes."""
    if calib is None:
        calib = torch.randn(32, *input_size, generator=torch.Generator().manual_seed(0))
    wd = workdir or Path(tempfile.mkdtemp(prefix="quantbench-latency-"))
    return LatencyContext(model.eval(), tuple(input_size), calib.float(), wd, threads, a_observer, workdir is None)


def bar_chart(report: LatencyReport, path: Path) -> Path:
    """Grouped bars: one group per batch size, one bar per runtime (median ms, log-free linear scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in report.rows})
    names = [r.runtime for r in report.rows if r.batch == batches[0] and r.median_ms is not None]
    labels = {r.runtime: r.label for r in report.rows}
    width = 0.8 / max(len(names), 1)
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        vals = {r.runtime: r.median_ms for r in report.rows if r.batch == b and r.median_ms is not None}
        for i, n in enumerate(names):
            ax.bar(i * width, vals.get(n, np.nan), width, label=labels[n])
        ax.set_xticks([])
        ax.set_title(f"batch {b}")
        ax.set_ylabel("median latency (ms)")
    handles, names_ = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{report.model} {'x'.join(map(str, report.input_size))}, {report.threads} thread(s)")
    fig.tight_layout(rect=(0, 0.06 * ((len(names) + 1) // 2), 1, 1))
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path
