"""Pareto analysis: Def. 4.1 verdicts on hand-made fronts, interpolation in log size, and size-matched widths
against seed 003's ResNet-20 C_size grid (methods.md 2.4: 2.8x 2-bit and 3.9x 1-bit end at 2.0x 4-bit's size)."""

from __future__ import annotations

import math

import pytest

from quantbench.errors import ConfigError
from quantbench.models import build_model
from quantbench.pareto import c_size_at, dominance, front_accuracy, size_matched_width

pytestmark = pytest.mark.usefixtures("torch_one_thread")
LOW = [(1.0, 60.0), (2.0, 66.0), (4.0, 70.0)]


def test_a_front_above_everywhere_dominates_and_the_sentence_says_so():
    high = [(1.5, 65.0), (3.0, 71.0), (6.0, 74.0)]
    v = dominance(high, LOW, "2-bit", "4-bit")
    assert v.winner == "a" and v.overlap == (1.5, 4.0)
    assert v.sentence().startswith("2-bit dominates 4-bit (seed 003 Def. 4.1)")
    assert dominance(LOW, high, "4-bit", "2-bit").winner == "b"


def test_crossing_fronts_and_disjoint_ranges_have_no_winner():
    crossing = [(1.0, 65.0), (4.0, 68.0)]
    v = dominance(crossing, LOW, "x", "y")
    assert v.winner is None and "cross" in v.sentence()
    assert min(v.margins) < 0 < max(v.margins)
    apart = dominance([(10.0, 80.0), (20.0, 81.0)], LOW)
    assert apart.winner is None and apart.overlap is None and "do not overlap" in apart.sentence()
    tie = dominance(LOW, LOW)
    assert tie.winner is None  # equal is not "more accurate"


def test_front_accuracy_interpolates_linearly_in_log_size():
    assert front_accuracy(LOW, 2.0) == 66.0
    assert front_accuracy(LOW, math.sqrt(2.0)) == pytest.approx(63.0)  # halfway between 1 and 2 in log size
    with pytest.raises(ValueError, match="outside the front's range"):
        front_accuracy(LOW, 8.0)


def _resnet20(width: float):
    return build_model("resnet20_cifar", num_classes=100, width_mult=width)


def test_c_size_matches_seed_003s_resnet20_grid():
    """methods.md 2.4 (100-way head, first/last 8 bits), C_size in 10^6 bits."""
    for width, bits, ref in [(1.0, 4, 1.1237), (2.0, 4, 4.3855), (2.8, 2, 4.3472), (3.9, 1, 4.2876)]:
        assert c_size_at(_resnet20, width, bits, (3, 32, 32)) / 1e6 == pytest.approx(ref, abs=5e-5)


@pytest.mark.parametrize("bits", [2, 1])
def test_size_matched_width_lands_within_2_percent_of_the_4_bit_2x_model(bits):
    target = c_size_at(_resnet20, 2.0, 4, (3, 32, 32))
    width, size = size_matched_width(_resnet20, target, bits, (3, 32, 32))
    assert abs(size - target) <= 0.02 * target
    assert 2.5 < width < 4.2  # seed 003's grid ends at 2.8x (2-bit) and 3.9x (1-bit)


def test_an_unreachable_size_is_refused_with_the_reachable_range():
    with pytest.raises(ConfigError, match="outside what widths"):
        size_matched_width(_resnet20, 1e12, 4, (3, 32, 32), hi=2.0)
