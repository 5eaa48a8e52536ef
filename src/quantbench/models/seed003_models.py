"""The CIFAR models of seed 003 (Appendix C), each with ``width_mult``: VGG11 and its depthwise variants A/B/C
(Table 6), Inv-ResNet26 (Table 5) and MobileNetV2 for CIFAR.

* **VGG11** (``vgg11_cifar``): the 8 convolutions of VGG11 (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
  each followed by BatchNorm and ReLU. Variant A replaces convolution 2 by ``Conv(c, 1x1) + DWConv(c, 3x3)``
  (``vgg11a_cifar``), B convolutions 2-5 (``vgg11b_cifar``), C every convolution but the first
  (``vgg11c_cifar``): 1 / 4 / 7 depthwise convolutions. *Head (the paper does not give one)*: after the fifth
  max-pool a 32x32 image is 1x1x512, so the classifier is one ``Linear(512 w, classes)``, as in the common CIFAR
  VGG implementations.
* **Inv-ResNet26** (``invresnet26_cifar``): stem ``Conv(16, 3x3)``, then 3 stages of 4 inverted-residual blocks
  ``Conv(6c, 1x1) -> DWConv(6c, 3x3) -> Conv(c, 1x1)`` with c = 16 / 32 / 64 and the first depthwise convolution
  of the stages strided 1 / 2 / 2; a block adds its input when stride and width allow (MobileNetV2's rule;
  *interpretation*: Table 5 lists layers, not shortcuts); BN after every convolution, ReLU after the first two;
  global average pool and a linear classifier. 12 depthwise convolutions.
* **MobileNetV2 for CIFAR** (``mobilenet_v2_cifar``): Sandler et al.'s Table 2 with every bottleneck stage at
  stride 1 except the fifth (96 channels), which is strided, and the stem kept at stride 2: 32 -> 16 -> 8, two
  down-samplings as the paper says. Built on torchvision's ``MobileNetV2`` (``inverted_residual_setting``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import MobileNetV2

from quantbench.models.cifar_resnet import scaled_width
from quantbench.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelEntry, register_model

VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
#: which of VGG11's 8 convolutions (1-based) become ``Conv 1x1 + DWConv 3x3`` in each variant (Table 6)
VGG_VARIANTS: dict[str, frozenset[int]] = {"": frozenset(), "a": frozenset({2}), "b": frozenset({2, 3, 4, 5}),
                                           "c": frozenset(range(2, 9))}
#: torchvision's Table 2 rows (t, c, n, s) with the CIFAR strides of seed 003: only the fifth stage strided
MOBILENET_V2_CIFAR = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 1], [6, 64, 4, 1], [6, 96, 3, 2], [6, 160, 3, 1],
                      [6, 320, 1, 1]]


def _conv_bn_relu(cin: int, cout: int, kernel: int, groups: int = 1, stride: int = 1,
                  relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


class VGG11Cifar(nn.Module):
    """VGG11 (with BN) for 32x32 inputs; ``depthwise`` the 1-based convolutions replaced by Conv 1x1 + DWConv 3x3."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0,
                 depthwise: frozenset[int] = frozenset()) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, index = 3, 0
        for v in VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            index += 1
            cout = scaled_width(int(v), width_mult)
            if index in depthwise:
                layers += _conv_bn_relu(cin, cout, 1) + _conv_bn_relu(cout, cout, 3, groups=cout)
            else:
                layers += _conv_bn_relu(cin, cout, 3)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class InvertedResidual(nn.Module):
    """``Conv(6c, 1x1) -> DWConv(6c, 3x3, stride) -> Conv(c, 1x1)``, plus the input when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int = 6) -> None:
        super().__init__()
        hidden = cin * expansion
        self.block = nn.Sequential(*_conv_bn_relu(cin, hidden, 1), *_conv_bn_relu(hidden, hidden, 3, hidden, stride),
                                   *_conv_bn_relu(hidden, cout, 1, relu=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class InvResNet26(nn.Module):
    """Seed 003 Table 5: stem, 3 x 4 inverted-residual blocks (c = 16/32/64, strides 1/2/2), pool, linear."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        c0 = scaled_width(16, width_mult)
        layers: list[nn.Module] = _conv_bn_relu(3, c0, 3)
        cin = c0
        for base, stride in ((16, 1), (32, 2), (64, 2)):
            c = scaled_width(base, width_mult)
            for i in range(4):
                layers.append(InvertedResidual(cin, c, stride if i == 0 else 1))
                cin = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 with seed 003's CIFAR strides (see the module docstring)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult,
                       inverted_residual_setting=[list(r) for r in MOBILENET_V2_CIFAR])


def _register(name: str, builder: object, description: str) -> None:
    register_model(ModelEntry(name=name, builder=builder,  # type: ignore[arg-type]
                              input_size=(3, 32, 32), num_classes=10, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              family="mobilenet" if "mobilenet" in name or "inv" in name else "small",
                              description=description))


for _variant, _convs in VGG_VARIANTS.items():
    _register(f"vgg11{_variant}_cifar",
              lambda w, k, d=_convs: VGG11Cifar(num_classes=k, width_mult=w, depthwise=d),
              f"VGG11-BN for CIFAR (seed 003 App. C{', variant ' + _variant.upper() if _variant else ''}: "
              f"{len(_convs)} depthwise convolutions)")
_register("invresnet26_cifar", lambda w, k: InvResNet26(num_classes=k, width_mult=w),
          "Inv-ResNet26 for CIFAR (seed 003 Table 5: 12 inverted-residual blocks)")
_register("mobilenet_v2_cifar", lambda w, k: mobilenet_v2_cifar(num_classes=k, width_mult=w),
          "MobileNetV2 for CIFAR (seed 003 App. C: only the fifth stage strided, 32 -> 8)")
