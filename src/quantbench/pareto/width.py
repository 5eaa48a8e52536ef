"""Size-matched widths (seed 003 Def. 4.1 compares precisions at equal size): the width multiplier at which a model
quantized at ``bits`` reaches a target C_size (eq. 6), within a tolerance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantbench.errors import ConfigError
from quantbench.size import c_size_of, depthwise_layers

Builder = Callable[[float], nn.Module]


def c_size_at(build: Builder, width: float, bits: int, input_size: tuple[int, int, int],
              first_last_bits: int | None = 8, depthwise_bits: int | None = None) -> int:
    """C_size in bits of ``build(width)`` with ``bits``-bit weights (first and last layer at ``first_last_bits``,
    depthwise convs at ``depthwise_bits``: DualPrecision, seed 003 section 6). The model is built on the ``meta``
    device (shapes only), so a search over widths costs no memory and no forward pass; ``input_size`` is kept for
    callers that size feature maps as well."""
    with torch.device("meta"):
        model = build(width)
    layer_bits = dict.fromkeys(depthwise_layers(model), depthwise_bits) if depthwise_bits is not None else None
    return c_size_of(model, bits, first_last_bits, layer_bits)


def size_matched_width(build: Builder, target_bits: float, bits: int, input_size: tuple[int, int, int],
                       first_last_bits: int | None = 8, tolerance: float = 0.02, lo: float = 0.05,
                       hi: float = 16.0, iterations: int = 40, depthwise_bits: int | None = None) -> tuple[float, int]:
    """``(width, C_size)``: the width whose C_size at ``bits`` is closest to ``target_bits`` (bisection on the
    width: C_size grows with it), within ``tolerance`` (relative) or a :class:`ConfigError` naming the closest."""
    if target_bits <= 0 or not 0 < tolerance < 1:
        raise ConfigError(f"target C_size must be > 0 and tolerance in (0, 1), got {target_bits}, {tolerance}")
    size_lo = c_size_at(build, lo, bits, input_size, first_last_bits, depthwise_bits)
    size_hi = c_size_at(build, hi, bits, input_size, first_last_bits, depthwise_bits)
    if not size_lo <= target_bits <= size_hi:
        raise ConfigError(f"C_size {target_bits:.6g} bits is outside what widths {lo}-{hi} reach at {bits} bits "
                          f"({size_lo:.6g}-{size_hi:.6g}): change the target or the width range")
    best = (hi, size_hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        size = c_size_at(build, mid, bits, input_size, first_last_bits, depthwise_bits)
        if abs(size - target_bits) < abs(best[1] - target_bits):
            best = (mid, size)
        if abs(size - target_bits) <= tolerance * target_bits / 4:
            break
        lo, hi = (mid, hi) if size < target_bits else (lo, mid)
    width, size = best
    if abs(size - target_bits) > tolerance * target_bits:
        raise ConfigError(f"no width reaches C_size {target_bits:.6g} bits within {tolerance:.0%} at {bits} bits "
                          f"(closest: width {width:.3f}, {size:.6g} bits; channel counts are integers)")
    return round(width, 4), size
