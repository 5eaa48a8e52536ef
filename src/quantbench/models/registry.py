"""Model registry: name -> :class:`ModelEntry` (builder plus input/normalization metadata)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from quantbench.errors import ConfigError
from quantbench.utils.registry import Registry

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

FAMILIES: tuple[str, ...] = (
    "resnet",
    "mobilenet",
    "regnet",
    "efficientnet",
    "shufflenet",
    "densenet",
    "small",
    "timm",
)

#: ``builder(width_mult, num_classes) -> nn.Module`` (random init, never downloads anything).
ModelBuilder = Callable[[float, int], torch.nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it and what input it expects.

    ``input_size`` is (C, H, W); ``mean``/``std`` are the per-channel normalization the model was
    (or should be) trained with; ``family`` selects training defaults (one of :data:`FAMILIES`).
    """

    name: str
    builder: ModelBuilder
    input_size: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    family: str
    description: str

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model {self.name!r}: family {self.family!r} not in {FAMILIES}")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ValueError(f"model {self.name!r}: mean/std length must equal input channels")


MODELS: Registry[ModelEntry] = Registry[ModelEntry]("model")


def register_model(entry: ModelEntry | str, **fields: Any) -> Any:
    """Register a model, as a decorator on its builder or with a ready :class:`ModelEntry`.

    ``@register_model("name", input_size=..., num_classes=..., mean=..., std=..., family=...,
    description=...)`` above ``def builder(width_mult, num_classes)`` registers the builder (and returns
    it unchanged); ``register_model(ModelEntry(...))`` adds the entry and returns it.
    """
    if isinstance(entry, ModelEntry):
        if fields:
            raise TypeError("register_model(entry) takes no other arguments")
        return MODELS.add(entry.name, entry)
    return MODELS.register(entry, wrap=lambda name, builder: ModelEntry(name=name, builder=builder, **fields))


def list_models(filter: str | list[str] | None = None, exclude: str | list[str] | None = None,
                family: str | None = None) -> list[str]:
    """Registered model names, sorted; ``filter`` / ``exclude`` are globs (as timm's ``list_models``,
    e.g. ``list_models("resnet*_cifar")``), ``family`` one of :data:`FAMILIES`."""
    names = MODELS.list(filter, exclude)
    return names if family is None else [n for n in names if MODELS.get(n).family == family]


#: ``PREFIX:NAME`` model sources (e.g. ``timm:resnet18``): prefix -> ``NAME -> ModelEntry``.
MODEL_SOURCES: Registry[Callable[[str], ModelEntry]] = Registry("model source")


def register_model_source(prefix: str) -> Callable[[Callable[[str], ModelEntry]], Callable[[str], ModelEntry]]:
    """Decorator on ``def entry(name) -> ModelEntry``: models named ``PREFIX:NAME`` come from it."""
    return MODEL_SOURCES.register(prefix)


@cache
def _sourced(prefix: str, name: str) -> ModelEntry:
    return MODEL_SOURCES.get(prefix)(name)


def get_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` for ``name``, a registered model or ``PREFIX:NAME`` of a model source
    (``UnknownNameError`` listing valid names otherwise)."""
    prefix, sep, rest = name.partition(":") if isinstance(name, str) else ("", "", "")
    if sep and prefix in MODEL_SOURCES:
        return _sourced(prefix, rest)
    return MODELS.get(name)


def build_model(
    name: str,
    weights: str | None = None,
    width_mult: float = 1.0,
    num_classes: int | None = None,
) -> torch.nn.Module:
    """Build registered model ``name`` in eval mode, optionally loading a local checkpoint.

    ``weights`` is a path to a ``.safetensors``/``.pt``/``.pth``/``.ckpt`` file (nothing is ever
    downloaded); ``num_classes`` defaults to the entry's.
    """
    entry = get_entry(name)
    if not (isinstance(width_mult, int | float) and width_mult > 0):
        raise ConfigError(f"width_mult must be a positive number, got {width_mult!r}")
    n_cls = entry.num_classes if num_classes is None else num_classes
    if not (isinstance(n_cls, int) and n_cls >= 1):
        raise ConfigError(f"num_classes must be a positive integer, got {n_cls!r}")
    model = entry.builder(float(width_mult), n_cls)
    if weights is not None:
        from quantbench.models.weights import load_weights

        load_weights(model, weights)
    return model.eval()
