"""The main job on the embedded default: the digits CNN on every backend and several calibrators."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from quantbench.backends import backend_names
from quantbench.cli.tables import results_table
from quantbench.config import PTQConfig
from quantbench.data import load_data
from quantbench.models import build_model, get_entry, load_weights, save_weights
from quantbench.ptq.pipeline import PTQResult, build_context, run_ptq
from quantbench.train.fp import train_classifier
from quantbench.utils.io import atomic_write_json
from quantbench.utils.progress import track

DEMO_MODEL = "digits_cnn"
BITS = ((8, 8), (4, 8), (4, 4))
CALIBRATORS = (("minmax", "minmax"), ("mse", "mse"), ("minmax", "kld"))


def ensure_digits_model(cache: Path, progress: bool = True) -> Path:
    """Train the digits CNN once and cache its weights (safetensors)."""
    path = cache / f"{DEMO_MODEL}.safetensors"
    if path.is_file():
        try:
            load_weights(build_model(DEMO_MODEL), str(path))
            return path
        except Exception:  # a stale or corrupt cache is retrained, never trusted
            path.unlink()
    entry = get_entry(DEMO_MODEL)
    bundle = load_data("digits", entry.mean, entry.std, entry.input_size)
    model = train_classifier(build_model(DEMO_MODEL), bundle, progress=progress)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_weights(model, str(tmp))
    tmp.replace(path)
    return path


def run_demo(out: Path, progress: bool = True, console: Console | None = None,
             backends: list[str] | None = None, bits: tuple[tuple[int, int], ...] = BITS,
             calibrators: tuple[tuple[str, str], ...] = CALIBRATORS) -> list[PTQResult]:
    """Train (or reuse) the digits CNN and PTQ it on every backend x bits x calibrator pair."""
    console = console or Console()
    t0 = time.perf_counter()
    weights = ensure_digits_model(out / "cache", progress)
    base = PTQConfig(model=DEMO_MODEL, weights=str(weights), data="digits", calib_size=256)
    context = build_context(base, progress=False)
    jobs = [(b, w, a, wo, ao) for b in (backends or backend_names()) for (w, a) in bits for (wo, ao) in calibrators]
    results = []
    for b, w, a, wo, ao in track(jobs, "PTQ sweep", len(jobs), progress):
        cfg = base.model_copy(update=dict(backend=b, w_bits=w, a_bits=a, w_observer=wo, a_observer=ao))
        results.append(run_ptq(cfg, progress=False, context=context))
    console.print(results_table(results, title=f"quantbench demo: {DEMO_MODEL} on digits "
                                               f"({results[0].n_test} test images)"))
    path = atomic_write_json(out / "demo_results.json", [r.to_dict() for r in results])
    console.print(f"{len(results)} runs in {time.perf_counter() - t0:.1f} s; results: {path}")
    return results
