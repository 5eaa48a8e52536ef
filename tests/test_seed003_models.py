"""Seed 003's CIFAR models (App. C): the depthwise counts of Tables 5-6, MobileNetV2-CIFAR's two down-samplings,
width multipliers, and C_size growing with the width."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quantbench.models import build_model, get_entry
from quantbench.size import model_size

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def depthwise_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in model.modules())


@pytest.mark.parametrize(("name", "count"), [("vgg11_cifar", 0), ("vgg11a_cifar", 1), ("vgg11b_cifar", 4),
                                             ("vgg11c_cifar", 7), ("invresnet26_cifar", 12)])
def test_depthwise_convolutions_as_tables_5_and_6_list(name, count):
    model = build_model(name, num_classes=100)
    assert depthwise_convs(model) == count
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert get_entry(name).input_size == (3, 32, 32)


def test_vgg_variants_replace_the_listed_convolutions_by_pointwise_plus_depthwise():
    plain, c = build_model("vgg11_cifar"), build_model("vgg11c_cifar")
    full = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    split = [m for m in c.modules() if isinstance(m, nn.Conv2d)]
    assert len(full) == 8 and len(split) == 1 + 2 * 7  # the first stays, the other 7 become two each
    assert [m.kernel_size for m in split[1:3]] == [(1, 1), (3, 3)] and split[2].groups == split[2].out_channels


def test_mobilenet_v2_cifar_down_samples_twice_from_32_to_8():
    model = build_model("mobilenet_v2_cifar").eval()
    feats = model.features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-2:] == (8, 8)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 2  # the stem and the fifth stage's first depthwise convolution


def test_inverted_residual_blocks_add_their_input_when_the_shape_is_kept():
    model = build_model("invresnet26_cifar")
    blocks = [m for m in model.modules() if type(m).__name__ == "InvertedResidual"]
    # every block but the strided openers of stages 2 and 3 (stage 1's first block is 16 -> 16 at stride 1)
    assert len(blocks) == 12 and sum(b.residual for b in blocks) == 10


@pytest.mark.parametrize("name", ["vgg11c_cifar", "invresnet26_cifar", "mobilenet_v2_cifar"])
def test_width_multiplier_scales_the_channels_and_c_size(name):
    half, double = build_model(name, width_mult=0.5), build_model(name, width_mult=2.0)
    assert half(torch.randn(1, 3, 32, 32)).shape == double(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    small = model_size(half, (3, 32, 32), w_bits=4).c_size_bits
    large = model_size(double, (3, 32, 32), w_bits=4).c_size_bits
    assert 8 < large / small < 17  # about quadratic in the width (first conv and head grow linearly)
