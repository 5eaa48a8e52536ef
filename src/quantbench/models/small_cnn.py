"""``digits_cnn``: a small residual CNN for scikit-learn's 8x8 handwritten digits (1x8x8, 10 classes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.models.cifar_resnet import scaled_width
from quantbench.models.registry import register_model

# Normalization statistics of sklearn.datasets.load_digits() scaled to [0, 1] (pixel / 16), over all
# 1797 images and all 64 pixels, computed once with float64 numpy:
#   x = load_digits().images / 16.0;  DIGITS_MEAN = x.mean();  DIGITS_STD = x.std()  (ddof=0)
# tests/test_models.py recomputes them.
DIGITS_MEAN: tuple[float] = (0.30526028624095713,)
DIGITS_STD: tuple[float] = (0.3760492217920148,)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity, then ReLU (channels and size preserved)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class DigitsCNN(nn.Module):
    """conv(1->16)-BN-ReLU, conv(16->32, stride 1)-BN-ReLU, residual block, global avg pool, linear."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        c1, c2 = scaled_width(16, width_mult), scaled_width(32, width_mult)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.block = ResidualBlock(c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalized (N, 1, 8, 8) batch."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(
    "digits_cnn",
    input_size=(1, 8, 8),
    num_classes=10,
    mean=DIGITS_MEAN,
    std=DIGITS_STD,
    family="small",
    description="small residual CNN with BN for scikit-learn 8x8 digits (trains in seconds on CPU)",
)
def _build_digits_cnn(width_mult: float, num_classes: int) -> nn.Module:
    return DigitsCNN(num_classes=num_classes, width_mult=width_mult)


class SeparableBlock(nn.Module):
    """Two depthwise-separable convs (DW 3x3-BN-ReLU, PW 1x1-BN) plus identity, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                       nn.BatchNorm2d(channels), nn.ReLU(),
                       nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels)]
            if i == 0:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual forward."""
        return F.relu(self.body(x) + x)


class DigitsDWCNN(nn.Module):
    """``digits_cnn`` with depthwise-separable convolutions (seed 003 App. C's VGG-B idea at digits scale):
    conv(1->16), PW(16->32) + DW 3x3, a residual block of two separable convs, global pool, linear (3 depthwise)."""

    def __init__(self, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        c1, c2 = scaled_width(16, width_mult), scaled_width(32, width_mult)
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.pw = nn.Conv2d(c1, c2, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(c2)
        self.dw = nn.Conv2d(c2, c2, 3, padding=1, groups=c2, bias=False)
        self.bn_dw = nn.BatchNorm2d(c2)
        self.block = SeparableBlock(c2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a normalized (N, 1, 8, 8) batch."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn_pw(self.pw(x)))
        x = F.relu(self.bn_dw(self.dw(x)))
        x = self.block(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model(
    "digits_dwcnn",
    input_size=(1, 8, 8),
    num_classes=10,
    mean=DIGITS_MEAN,
    std=DIGITS_STD,
    family="small",
    description="digits_cnn with depthwise-separable convolutions (3 depthwise), for DualPrecision at digits scale",
)
def _build_digits_dwcnn(width_mult: float, num_classes: int) -> nn.Module:
    return DigitsDWCNN(num_classes=num_classes, width_mult=width_mult)
