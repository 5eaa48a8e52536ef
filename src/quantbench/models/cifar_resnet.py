"""CIFAR ResNets (He et al. 2016, section 4.2) with option-A shortcuts, matching ../shared checkpoints.

Depth 6n+2: ``conv1`` 3x3 -> ``bn1`` -> ReLU -> layer1/2/3 (n BasicBlocks each, widths 16/32/64 times
``width_mult``, first block of layer2/3 strided) -> global average pool -> ``linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelEntry, register_model


def scaled_width(base: int, width_mult: float) -> int:
    """``round(base * width_mult)``, at least 1."""
    return max(1, round(base * width_mult))


class LambdaShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad channels on both sides."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        extra = planes - in_planes
        if extra < 0:
            raise ValueError(f"option-A shortcut cannot shrink channels ({in_planes} -> {planes})")
        self.stride = stride
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample then pad channels (all constants: fx-traceable)."""
        if self.stride != 1:  # a Python attribute, not data-dependent
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (
            LambdaShortcutA(in_planes, planes, stride) if stride != 1 or in_planes != planes else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (``num_blocks = n``)."""

    def __init__(self, num_blocks: int, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        w1, w2, w3 = (scaled_width(b, width_mult) for b in (16, 32, 64))
        self.conv1 = nn.Conv2d(3, w1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.in_planes = w1
        self.layer1 = self._make_layer(w1, num_blocks, 1)
        self.layer2 = self._make_layer(w2, num_blocks, 2)
        self.layer3 = self._make_layer(w3, num_blocks, 2)
        self.linear = nn.Linear(w3, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalized (N, 3, 32, 32) batch."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _register(depth: int) -> None:
    n = (depth - 2) // 6

    def builder(width_mult: float, num_classes: int) -> nn.Module:
        return CifarResNet(n, num_classes=num_classes, width_mult=width_mult)

    register_model(
        ModelEntry(
            name=f"resnet{depth}_cifar",
            builder=builder,
            input_size=(3, 32, 32),
            num_classes=10,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            family="resnet",
            description=f"CIFAR ResNet-{depth} (He et al. 2016 sec 4.2, option-A shortcuts)",
        )
    )


for _depth in (20, 32, 44, 56):
    _register(_depth)
