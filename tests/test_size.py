"""Model size and inference memory against known parameter counts and hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from quantbench.cli.main import app
from quantbench.errors import ConfigError
from quantbench.models import build_model
from quantbench.size import model_size

runner = CliRunner()


class Tiny(nn.Module):
    """conv 3->8 (3x3, no bias) -> ReLU -> conv 8->4 (1x1, bias) -> flatten -> linear 256->10."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.a(x))).flatten(1))


def test_hand_computed_sizes_of_a_tiny_network():
    r = model_size(Tiny(), (3, 8, 8), w_bits=3, a_bits=4)
    # weights: a 8*3*3*3 = 216, b 4*8 = 32, fc 10*256 = 2560; biases 4 + 10
    assert [(layer.name, layer.weights, layer.filters, layer.fan_in) for layer in r.layers] == [
        ("a", 216, 8, 27), ("b", 32, 4, 8), ("fc", 2560, 10, 256)]
    assert r.total_params == 216 + 32 + 2560 + 4 + 10 and r.other_params == 14
    assert r.c_size_bits == 3 * (8 * 27 + 4 * 8 + 10 * 256)  # eq. 6
    assert r.weight_bytes == 81 + 12 + 960  # ceil(3 * n / 8) per layer
    assert r.deployed_bytes == r.weight_bytes + 4 * (8 + 4 + 10)
    # feature maps: a out 8*8*8 = 512, b out 4*8*8 = 256, fc out 10; inputs 192, 512, 256
    assert (r.fmap_max_elems, r.fmap_sum_elems) == (512, 512 + 256 + 10)
    assert r.fmap_bytes(r.fmap_max_elems) == 256  # 4-bit
    assert r.footprint_bytes == 512 * 4 / 8 + 512 * 4 / 8 + r.weight_bytes  # largest in + largest out + weights


def test_first_last_and_per_layer_bits():
    r = model_size(Tiny(), (3, 8, 8), w_bits=2, first_last_bits=8, layer_bits={"b": 5})
    assert [layer.bits for layer in r.layers] == [8, 5, 8]
    with pytest.raises(ConfigError, match="unknown layers"):
        model_size(Tiny(), (3, 8, 8), layer_bits={"nope": 4})


@pytest.mark.parametrize(("name", "params_m"), [("resnet18", 11.69), ("mobilenet_v2", 3.50)])
def test_known_parameter_counts_and_4_bit_is_one_eighth_of_fp32(name, params_m):
    r = model_size(build_model(name), (3, 64, 64), w_bits=4)
    assert round(r.total_params / 1e6, 2) == params_m
    assert r.all_params_bytes(4) * 8 == r.fp32_bytes  # seed 000's 11.69 -> 1.47 is this ratio
    assert r.fp32_bytes == 4 * r.total_params
    assert r.weight_bytes == sum((4 * layer.weights + 7) // 8 for layer in r.layers)


def test_resnet20_counts():
    r = model_size(build_model("resnet20_cifar"), (3, 32, 32), w_bits=8)
    assert r.total_params == 269_722 and r.weight_params == 268_336
    assert r.c_size_bits == 8 * r.weight_params  # every weight is in exactly one filter
    assert r.fmap_max_elems == 16 * 32 * 32


def test_cli_prints_both_first_last_variants_and_writes_json(tmp_path):
    out = tmp_path / "size.json"
    res = runner.invoke(app, ["size", "--model", "resnet20_cifar", "--w-bits", "4", "--a-bits", "8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "C_size" in res.output and "first/last 8-bit" in res.output and "App. F" in res.output
    data = json.loads(out.read_text())
    assert set(data) == {"first/last 4-bit", "first/last 8-bit"}
    assert data["first/last 8-bit"]["weight_bytes_packed"] > data["first/last 4-bit"]["weight_bytes_packed"]
    assert data["first/last 4-bit"]["all_params_bytes_at_w_bits"] * 8 == data["first/last 4-bit"]["fp32_bytes"]


def test_cli_with_an_8_bit_first_last_also_shows_the_uniform_model(tmp_path):
    """--first-last 8 is one of the two variants; the other is every layer at --w-bits."""
    out = tmp_path / "size.json"
    res = runner.invoke(app, ["size", "--model", "resnet20_cifar", "--w-bits", "4", "--first-last", "8",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data) == {"first/last 8-bit", "first/last 4-bit"}
    assert data["first/last 8-bit"]["weight_bytes_packed"] > data["first/last 4-bit"]["weight_bytes_packed"]


# seed 003 eq. 6 reference: ResNet-20, 100-way head, first and last layer at 8 bits, C_size in 10^6 bits
C_SIZE_REFERENCE = [(1.0, 4, 1.1237), (1.0, 2, 0.5892), (1.0, 1, 0.3219), (2.0, 4, 4.3855), (2.0, 2, 2.2474),
                    (2.0, 1, 1.1784), (2.8, 2, 4.3472), (3.9, 1, 4.2876)]


@pytest.mark.parametrize(("width", "bits", "c_size"), C_SIZE_REFERENCE)
def test_c_size_matches_the_reference_values(width, bits, c_size):
    net = build_model("resnet20_cifar", width_mult=width, num_classes=100)
    assert round(model_size(net, (3, 32, 32), bits, 4, first_last_bits=8).c_size_bits / 1e6, 4) == c_size


@pytest.mark.parametrize(("width", "bits", "c_size"), [r for r in C_SIZE_REFERENCE if r[1] > 1])
def test_cards_and_report_use_the_same_c_size(width, bits, c_size):
    """The prepared model's size (cards, report, the sweep's model_size_bytes) is eq. 6 too: weights only."""
    from quantbench.backends import load_backend
    from quantbench.graph.quantize import prepare
    from quantbench.report.size import model_size as report_size

    net = build_model("resnet20_cifar", width_mult=width, num_classes=100)
    gm = prepare(net, load_backend("academic").configure(w_bits=bits, a_bits=4, first_last=8),
                 torch.zeros(1, 3, 32, 32), "minmax", "minmax")
    size = report_size(gm)
    assert round(size.quantized_bytes * 8 / 1e6, 4) == c_size
    assert size.fp32_bytes == 4 * size.weight_params
    assert size.weight_params == model_size(net, (3, 32, 32)).weight_params


def test_depthwise_convs_count_c_in_over_groups_in_both_paths():
    from quantbench.backends import load_backend
    from quantbench.graph.quantize import prepare
    from quantbench.size import prepared_size

    net = build_model("mobilenet_v2", width_mult=0.5, num_classes=10)
    r = model_size(net, (3, 32, 32), w_bits=8)
    dw = next(layer for layer in r.layers if layer.kind == "Conv2d" and layer.fan_in == 9)  # 1 x 3 x 3 per filter
    assert dw.c_size_bits == 8 * dw.filters * 9 and r.c_size_bits == 8 * r.weight_params
    gm = prepare(net, load_backend("fbgemm"), torch.zeros(1, 3, 32, 32), "minmax", "minmax")
    assert prepared_size(gm).c_size_bits == r.c_size_bits
