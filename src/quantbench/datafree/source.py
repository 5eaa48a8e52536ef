"""Where calibration / reconstruction / fine-tuning images come from: ``real``, ``noise[:N]`` or
``synthetic:GENERATOR[:N]``, and the on-disk cache of generated sets.

A generated set is identified by the float model's weights (a SHA-256 over its state dict), the generator and
its options, the number of images, the seed and the input size; it is stored as safetensors under
``$QUANTBENCH_CACHE_DIR/synthetic/`` (default ``~/.cache/quantbench``), so every run of a sweep on the same
model generates once. Changing the weights or any option makes a new set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from quantbench.data.loaders import TensorImageDataset
from quantbench.datafree.generators import GENERATORS, Target, build_generator
from quantbench.errors import ConfigError
from quantbench.utils.io import atomic_write

CACHE_VERSION = 1
_SPEC = re.compile(r"^(?P<kind>real|noise|synthetic)(?::(?P<gen>[a-z][a-z0-9_-]*))?(?::(?P<n>\d+))?$")


@dataclass(frozen=True)
class DataSource:
    """A parsed ``--calib-data`` value."""

    kind: Literal["real", "noise", "synthetic"]
    generator: str | None = None  # "noise" for noise, the generator's name for synthetic
    n: int | None = None  # images to make (None: as many as the run needs)

    @property
    def label(self) -> str:
        return "real" if self.kind == "real" else ("noise" if self.kind == "noise" else f"synthetic ({self.generator})")


def parse_data_source(spec: str) -> DataSource:
    """``real`` | ``noise[:N]`` | ``synthetic:GENERATOR[:N]`` (a one-line error naming the valid forms)."""
    m = _SPEC.match(spec.strip())
    forms = f"real, noise[:N] or synthetic:GENERATOR[:N] with GENERATOR one of {', '.join(_synthetic_names())}"
    if m is None:
        raise ConfigError(f"calib_data {spec!r} is not a data source: use {forms}")
    kind, gen, n = m.group("kind"), m.group("gen"), m.group("n")
    if kind == "noise" and gen is not None and not gen.isdigit():
        raise ConfigError(f"calib_data {spec!r}: noise takes only a count (noise:N); use {forms}")
    if kind == "real":
        if gen is not None or n is not None:
            raise ConfigError(f"calib_data {spec!r}: real takes no options (the count is --calib-size); use {forms}")
        return DataSource("real")
    if kind == "noise":
        return DataSource("noise", "noise", int(n) if n else None)
    if gen is None:
        raise ConfigError(f"calib_data {spec!r} names no generator: use {forms}")
    if gen not in _synthetic_names():
        raise ConfigError(f"calib_data {spec!r}: unknown generator {gen!r}; use {forms}")
    if n is not None and int(n) < 1:
        raise ConfigError(f"calib_data {spec!r}: make at least 1 image; use {forms}")
    return DataSource("synthetic", gen, int(n) if n else None)


def _synthetic_names() -> list[str]:
    return [g for g in GENERATORS.names() if g != "noise"]


@dataclass
class SourceImages:
    """Images made for a run and what a card needs to know about them."""

    images: Tensor
    labels: Tensor | None
    source: DataSource
    generation_seconds: float
    cached: bool
    real_images: int
    identity: str
    loss_curve: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def dataset(self, n: int) -> TensorImageDataset:
        """The first ``n`` images (all when fewer) as a dataset with placeholder labels (calibration reads none)."""
        m = min(n, self.images.shape[0])
        return TensorImageDataset(self.images[:m], torch.zeros(m, dtype=torch.long))

    def card(self) -> dict[str, Any]:
        """The card's facts about the data (seed 004 Table 1: type, amount, labels, time)."""
        return {"type": self.source.label, "images": int(self.images.shape[0]),
                "real_images_used": self.real_images, "data_free": self.real_images == 0,
                "labels": "none" if self.labels is None else "generator class targets (not used for calibration)",
                "generation_seconds": round(self.generation_seconds, 3), "cached": self.cached,
                "identity": self.identity, **{k: v for k, v in self.info.items() if k != "batch_seconds"}}


def cache_dir() -> Path:
    root = os.environ.get("QUANTBENCH_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "quantbench") / "synthetic"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, shapes, dtypes and bytes), in key order."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def make_images(source: DataSource, model: nn.Module, input_size: tuple[int, int, int], num_classes: int,
                n: int, seed: int = 0, device: str | torch.device = "cpu", progress: bool = True,
                options: dict[str, Any] | None = None, mean: tuple[float, ...] = (),
                std: tuple[float, ...] = ()) -> SourceImages:
    """``n`` images from ``source`` for ``model`` (cached by identity); ``source`` must not be ``real``."""
    if source.kind == "real":
        raise ConfigError("make_images makes noise or synthetic images; real images come from the dataset")
    n = source.n or n
    gen = build_generator(source.generator or "noise", options)
    ident = _identity(model, source, gen.options.model_dump(), n, seed, input_size, num_classes)
    path = cache_dir() / f"{ident}.safetensors"
    if path.is_file():
        try:
            return _load(path, source, ident)
        except Exception:
            path.unlink(missing_ok=True)
    was_training = model.training
    target = Target(model.to(device), input_size, num_classes, torch.device(device), mean, std)
    try:
        out = gen.generate(target, n, seed, progress)
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(True)
    if not torch.isfinite(out.images).all():
        raise ConfigError(f"the {source.label} images are not finite; lower the generator's lr "
                          "(synthetic options) or use more iterations")
    result = SourceImages(out.images, out.labels, source, out.seconds, False, out.real_images, ident,
                          out.loss_curve, dict(out.info))
    _store(path, result)
    return result


def _identity(model: nn.Module, source: DataSource, options: dict[str, Any], n: int, seed: int,
              input_size: tuple[int, int, int], num_classes: int) -> str:
    record = {"version": CACHE_VERSION, "weights": weights_digest(model), "generator": source.generator,
              "options": options, "n": n, "seed": seed, "input_size": list(input_size), "classes": num_classes}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def _store(path: Path, s: SourceImages) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"images": s.images.contiguous()}
    if s.labels is not None:
        tensors["labels"] = s.labels.contiguous()
    meta = {"meta": json.dumps({"seconds": s.generation_seconds, "real_images": s.real_images,
                                "loss_curve": s.loss_curve, "info": s.info})}
    data = save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def _load(path: Path, source: DataSource, ident: str) -> SourceImages:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    return SourceImages(tensors["images"], tensors.get("labels"), source, float(meta.get("seconds", 0.0)), True,
                        int(meta.get("real_images", 0)), ident, list(meta.get("loss_curve", [])),
                        dict(meta.get("info", {})))
