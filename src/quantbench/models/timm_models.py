"""timm classifiers as ``timm:NAME`` (any model ``timm.list_models()`` knows), random init; ``--weights`` loads a
local safetensors / ``weights_only`` checkpoint. Nothing is ever downloaded (``pretrained=False`` always).

The input size and normalisation come from the model's default pretrained config in timm (metadata only, no
weights); the family (QAT recipe defaults) from the name: resnet / mobilenet / regnet / efficientnet, else
``timm`` (no recipe: QAT then asks for --lr and --weight-decay). ``pip install 'quantbench[timm]'``.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from quantbench.errors import ConfigError
from quantbench.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelEntry, register_model_source
from quantbench.utils.optional import require_module

PREFIX = "timm"
#: name prefix -> quantbench family (first match wins)
_FAMILIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("resnet", "resnext", "seresnet", "wide_resnet", "resnetv2"), "resnet"),
    (("mobilenet", "mnasnet", "lcnet"), "mobilenet"),
    (("regnet",), "regnet"),
    (("efficientnet", "tf_efficientnet"), "efficientnet"),
)


def import_timm() -> Any:
    """The ``timm`` module, or a :class:`ConfigError` naming the extra to install."""
    return require_module("timm", "timm:NAME models", "timm")


def family_of(name: str) -> str:
    for prefixes, family in _FAMILIES:
        if name.startswith(prefixes):
            return family
    return "timm"


def list_timm(filter: str = "") -> list[str]:
    """timm's model names matching the glob ``filter`` (all when empty)."""
    return list(import_timm().list_models(filter or ""))


@register_model_source(PREFIX)
def timm_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` of timm model ``name`` (without the ``timm:`` prefix)."""
    timm = import_timm()
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.7) if name else []
        hint = f" (names like it: {', '.join(close)})" if close else ""
        raise ConfigError(f"timm has no model {name!r}{hint}; `quantbench models --timm 'GLOB'` lists them")
    cfg = timm.models.get_pretrained_cfg(name)
    input_size = tuple(cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    mean = tuple(cfg.mean) if cfg is not None and cfg.mean else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg is not None and cfg.std else IMAGENET_STD
    if len(mean) != input_size[0]:  # a grey-scale config with a 3-value default, or the reverse
        mean, std = (mean[0],) * input_size[0], (std[0],) * input_size[0]
    classes = int(cfg.num_classes) if cfg is not None and cfg.num_classes else 1000

    def builder(width_mult: float, num_classes: int) -> nn.Module:
        if width_mult != 1.0:
            raise ConfigError(f"timm model {name!r} takes no width_mult (got {width_mult}); pick a timm variant of "
                              "the width you want (e.g. mobilenetv3_large_075) and width_mult 1.0")
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return ModelEntry(name=f"{PREFIX}:{name}", builder=builder, input_size=input_size,  # type: ignore[arg-type]
                      num_classes=classes, mean=mean, std=std, family=family_of(name),
                      description=f"timm {name} (random init unless --weights)")
