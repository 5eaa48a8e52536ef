"""``weights: train``: small models are trained once by quantbench and cached (the demo's digits CNN)."""

from __future__ import annotations

from pathlib import Path

import torch

from quantbench.data import load_data, parse_spec
from quantbench.models import build_model, get_entry, load_weights, save_weights
from quantbench.train.fp import train_classifier


def train_recipe(model: str, data: str) -> str:
    """The identity of weights that quantbench trains (stable across machines)."""
    return f"train:{model}:{data}"


def cache_path(cache: Path, model: str, data: str) -> Path:
    kind, _ = parse_spec(data)
    return cache / (f"{model}.safetensors" if kind == "digits" else f"{model}-{kind}.safetensors")


def ensure_trained(model: str, data: str, cache: Path, progress: bool = True, epochs: int = 30) -> Path:
    """Train ``model`` on ``data`` once and cache its weights (safetensors); a corrupt cache is retrained."""
    path = cache_path(cache, model, data)
    if path.is_file():
        try:
            load_weights(build_model(model), str(path))
            return path
        except Exception:  # a stale or corrupt cache is retrained, never trusted
            path.unlink()
    entry = get_entry(model)
    bundle = load_data(data, entry.mean, entry.std, entry.input_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible on any core count, and fastest for a small model on busy cores
    try:
        trained = train_classifier(build_model(model, num_classes=bundle.num_classes), bundle, epochs=epochs,
                                   progress=progress)
    finally:
        torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.safetensors")
    save_weights(trained, str(tmp))
    tmp.replace(path)
    return path
