"""torchvision ImageNet classifiers, always built with ``weights=None`` (nothing is downloaded).

Pretrained weights can be loaded from a local file with ``build_model(name, weights=PATH)``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision import models as tvm

from quantbench.errors import ConfigError
from quantbench.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelEntry, register_model

#: (name, family, torchvision constructor, supports ``width_mult``)
_TORCHVISION: tuple[tuple[str, str, Callable[..., nn.Module], bool], ...] = (
    ("resnet18", "resnet", tvm.resnet18, False),
    ("resnet34", "resnet", tvm.resnet34, False),
    ("resnet50", "resnet", tvm.resnet50, False),
    ("mobilenet_v2", "mobilenet", tvm.mobilenet_v2, True),
    ("mobilenet_v3_small", "mobilenet", tvm.mobilenet_v3_small, False),
    ("mobilenet_v3_large", "mobilenet", tvm.mobilenet_v3_large, False),
    ("regnet_x_400mf", "regnet", tvm.regnet_x_400mf, False),
    ("regnet_y_400mf", "regnet", tvm.regnet_y_400mf, False),
    ("efficientnet_b0", "efficientnet", tvm.efficientnet_b0, False),
    ("shufflenet_v2_x0_5", "shufflenet", tvm.shufflenet_v2_x0_5, False),
    ("shufflenet_v2_x1_0", "shufflenet", tvm.shufflenet_v2_x1_0, False),
    ("densenet121", "densenet", tvm.densenet121, False),
)

#: torchvision models that accept ``width_mult``.
WIDTH_MULT_SUPPORTED: tuple[str, ...] = tuple(n for n, _, _, ok in _TORCHVISION if ok)


def _make_builder(name: str, ctor: Callable[..., nn.Module], supports_width: bool) -> Callable[[float, int], nn.Module]:
    def builder(width_mult: float, num_classes: int) -> nn.Module:
        kwargs: dict[str, object] = {"weights": None, "num_classes": num_classes}
        if supports_width:
            kwargs["width_mult"] = width_mult
        elif width_mult != 1.0:
            raise ConfigError(
                f"model {name!r} does not support width_mult={width_mult}; among torchvision models only "
                f"{', '.join(WIDTH_MULT_SUPPORTED)} do (the CIFAR ResNets and digits_cnn also do). "
                "Use width_mult=1.0 or pick one of those models."
            )
        return ctor(**kwargs)

    return builder


for _name, _family, _ctor, _width in _TORCHVISION:
    register_model(
        ModelEntry(
            name=_name,
            builder=_make_builder(_name, _ctor, _width),
            input_size=(3, 224, 224),
            num_classes=1000,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            family=_family,
            description=f"torchvision {_name} (random init; load ImageNet weights from a local file)",
        )
    )
