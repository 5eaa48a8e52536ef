"""Model size and single-image inference memory at any per-layer bit-width (seed 003 eq. 6 and Appendix F,
seed 000 section 3).

* ``C_size = sum_i b(i) C_in(i) K_w(i) K_h(i)`` over every filter ``i`` of every conv / linear layer
  (eq. 6, in bits; a linear layer is a 1x1 filter per output feature; grouped convs see ``C_in / groups``).
* Packed weight bytes: ``ceil(b * n / 8)`` per layer, ``n`` its weight count.
* Deployed bytes: packed weights plus one int32 bias per output channel (BN folded).
* All-parameter bytes at ``b`` bits (every parameter, BN and biases included, at the same width): the
  convention behind seed 000's "ResNet-18 11.69 -> 1.47": 4-bit is exactly 1/8 of the FP32 bytes.
* Feature maps: the output of every conv / linear layer for one image, at the activation bit-width (max and
  sum); the Appendix F footprint is the largest layer input plus the largest layer output plus the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from quantbench.errors import ConfigError

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class LayerSize:
    name: str
    kind: str
    weights: int  # weight count
    filters: int  # output channels / features (O in eq. 6)
    fan_in: int  # C_in(i) K_w(i) K_h(i): weights per filter
    bits: int
    input_elems: int
    output_elems: int

    @property
    def c_size_bits(self) -> int:
        return self.bits * self.filters * self.fan_in

    @property
    def packed_bytes(self) -> int:
        return math.ceil(self.bits * self.weights / 8)


@dataclass
class SizeReport:
    """Sizes of one model at one bit-width assignment (bytes unless named otherwise)."""

    model: str
    input_size: tuple[int, ...]
    w_bits: int
    a_bits: int
    first_last_bits: int | None
    layers: list[LayerSize]
    total_params: int
    other_params: int  # everything that is not a conv / linear weight (biases, BN, ...)
    notes: list[str] = field(default_factory=list)

    @property
    def weight_params(self) -> int:
        return sum(layer.weights for layer in self.layers)

    @property
    def c_size_bits(self) -> int:
        return sum(layer.c_size_bits for layer in self.layers)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.total_params

    @property
    def weight_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)

    @property
    def deployed_bytes(self) -> int:
        return self.weight_bytes + 4 * sum(layer.filters for layer in self.layers)

    def all_params_bytes(self, bits: int | None = None) -> float:
        return self.total_params * (self.w_bits if bits is None else bits) / 8

    @property
    def fmap_max_elems(self) -> int:
        return max((layer.output_elems for layer in self.layers), default=0)

    @property
    def fmap_sum_elems(self) -> int:
        return sum(layer.output_elems for layer in self.layers)

    def fmap_bytes(self, elems: int) -> float:
        return elems * self.a_bits / 8

    @property
    def footprint_bytes(self) -> float:
        """Appendix F: largest input feature map + largest output feature map + all weights."""
        max_in = max((layer.input_elems for layer in self.layers), default=0)
        return self.fmap_bytes(max_in) + self.fmap_bytes(self.fmap_max_elems) + self.weight_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "input_size": list(self.input_size), "w_bits": self.w_bits, "a_bits": self.a_bits,
            "first_last_bits": self.first_last_bits, "total_params": self.total_params,
            "weight_params": self.weight_params, "other_params": self.other_params,
            "c_size_bits": self.c_size_bits, "c_size_1e6": self.c_size_bits / 1e6, "fp32_bytes": self.fp32_bytes,
            "weight_bytes_packed": self.weight_bytes, "deployed_bytes": self.deployed_bytes,
            "all_params_bytes_at_w_bits": self.all_params_bytes(),
            "fmap_max_elems": self.fmap_max_elems, "fmap_sum_elems": self.fmap_sum_elems,
            "fmap_max_bytes": self.fmap_bytes(self.fmap_max_elems),
            "fmap_sum_bytes": self.fmap_bytes(self.fmap_sum_elems),
            "footprint_bytes": self.footprint_bytes, "notes": self.notes,
            "layers": [{**asdict(layer), "c_size_bits": layer.c_size_bits, "packed_bytes": layer.packed_bytes}
                       for layer in self.layers],
        }


@torch.no_grad()
def _layer_shapes(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """(input elements, output elements) of every conv / linear module for one image."""
    shapes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, WEIGHTED):
            def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                shapes[name] = (inp[0][0].numel(), out[0].numel())
            hooks.append(m.register_forward_hook(hook))
    try:
        model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def model_size(model: nn.Module, input_size: tuple[int, ...], w_bits: int = 8, a_bits: int = 8,
               first_last_bits: int | None = None, layer_bits: Mapping[str, int] | None = None,
               name: str = "") -> SizeReport:
    """Sizes of ``model`` with ``w_bits`` weights (``first_last_bits`` for the first and last layer,
    ``layer_bits`` per layer name on top) and ``a_bits`` activations, for one image of ``input_size``."""
    for what, b in (("w_bits", w_bits), ("a_bits", a_bits), ("first_last_bits", first_last_bits)):
        if b is not None and not 1 <= b <= 32:
            raise ConfigError(f"{what} must be in 1..32, got {b}")
    layer_bits = dict(layer_bits or {})
    shapes = _layer_shapes(model, tuple(input_size))
    names = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED) and n in shapes]
    unknown = sorted(set(layer_bits) - set(names))
    if unknown:
        raise ConfigError(f"--layer-bits names unknown layers {unknown[:5]}; layers are e.g. {names[:5]}")
    edge = {names[0], names[-1]} if names else set()
    modules = dict(model.named_modules())
    layers = []
    for n in names:
        m = modules[n]
        bits = layer_bits.get(n, first_last_bits if (first_last_bits is not None and n in edge) else w_bits)
        w = m.weight
        layers.append(LayerSize(n, type(m).__name__, w.numel(), w.shape[0], w[0].numel(), int(bits), *shapes[n]))
    total = sum(p.numel() for p in model.parameters())
    notes = [] if len(names) == len([m for m in model.modules() if isinstance(m, WEIGHTED)]) else [
        "some conv/linear modules never ran on this input and are not counted"]
    return SizeReport(name or type(model).__name__, tuple(input_size), w_bits, a_bits, first_last_bits, layers,
                      total, total - sum(layer.weights for layer in layers), notes)
