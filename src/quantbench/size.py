"""The one model-size definition of quantbench (seed 003 eq. 6 and Appendix F, seed 000 section 3), for a float
model at any per-layer bit-width (:func:`model_size`, ``quantbench size``) and for a prepared model at the bits its
quantizers use (:func:`prepared_size`: cards, the report's size axis, the sweep's ``model_size_bytes``).

* ``C_size = sum_i b(i) C_in(i) K_w(i) K_h(i)`` in bits over every filter ``i`` of every conv / linear layer
  (eq. 6). Counted: the weights of every conv and linear layer, the classifier included (a linear layer is a
  1x1 filter per output feature, ``C_in`` = its input features), at the layer's bits (32 for a layer kept in
  float); grouped / depthwise convs see ``C_in / groups``. Not counted: biases, BatchNorm parameters and the
  quantizers' scales / zero-points. With this, ResNet-20 with a 100-way head and an 8-bit first and last layer
  gives C_size (10^6 bits) 1.1237 / 0.5892 / 0.3219 at 4 / 2 / 1 bits (width 1.0x), 4.3855 / 2.2474 / 1.1784
  at 2.0x, 4.3472 at 2.8x 2-bit and 4.2876 at 3.9x 1-bit (tests/test_size.py).
* Packed weight bytes: ``ceil(b * n / 8)`` per layer, ``n`` its weight count.
* Deployed bytes: packed weights plus one int32 bias per output channel (BN folded).
* All-parameter bytes at ``b`` bits (every parameter, BN and biases included, at the same width): the
  convention behind seed 000's "ResNet-18 11.69 -> 1.47": 4-bit is exactly 1/8 of the FP32 bytes.
* Feature maps: the output of every conv / linear layer for one image, at the activation bit-width (max and
  sum); the Appendix F footprint (single image) is the largest layer input plus the largest layer output plus
  all weights (packed).
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
FP_BITS = 32  # a layer kept in float


def c_size_bits(weight: torch.Tensor, bits: int) -> int:
    """Eq. 6 for one layer: ``b * O * C_in/groups * K_w * K_h`` (the weight is ``O x C_in/groups x K_h x K_w``)."""
    return int(bits) * int(weight.shape[0]) * int(weight[0].numel())


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
    def c_size_bits(self) -> int:  # eq. 6, as c_size_bits(weight, bits)
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


def is_depthwise(m: nn.Module) -> bool:
    """A depthwise conv: ``groups == in_channels > 1`` (what the ``depthwise`` override matches)."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def depthwise_layers(model: nn.Module) -> list[str]:
    """Names of the depthwise convs of ``model``, in module order."""
    return [n for n, m in model.named_modules() if is_depthwise(m)]


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


def c_size_of(model: nn.Module, w_bits: int, first_last_bits: int | None = None,
              layer_bits: Mapping[str, int] | None = None) -> int:
    """Eq. 6 alone, from the weight shapes (no forward pass: works on a ``meta``-device model). The first and last
    conv / linear layer in module order get ``first_last_bits``; ``layer_bits`` per name wins over both; equal to
    :func:`model_size`'s ``c_size_bits`` when every layer runs in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    edge = {names[0], names[-1]} if names and first_last_bits is not None else set()
    modules = dict(model.named_modules())
    bits = {n: (layer_bits or {}).get(n, first_last_bits if n in edge else w_bits) for n in names}
    return sum(c_size_bits(modules[n].weight, int(b)) for n, b in bits.items())  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelSize:
    """C_size of a prepared model (eq. 6) in bytes, at its quantizers' bits and in FP32."""

    c_size_bits: int
    fp32_bits: int
    weight_params: int

    @property
    def quantized_bytes(self) -> float:
        return self.c_size_bits / 8

    @property
    def fp32_bytes(self) -> float:
        return self.fp32_bits / 8

    @property
    def compression(self) -> float:
        return self.fp32_bits / self.c_size_bits if self.c_size_bits else 0.0


def prepared_size(gm: nn.Module) -> ModelSize:
    """C_size (eq. 6, as above) of a prepared model: every conv/linear weight at its weight quantizer's bits,
    32 bits where the layer is kept in float."""
    from quantbench.graph.qmodules import QuantWeighted

    q = f = n = 0
    for m in gm.modules():
        if isinstance(m, QuantWeighted):
            w = m.module.weight
            bits = m.weight_quantizer.scheme.bits if m.weight_quantizer is not None else FP_BITS
            q += c_size_bits(w, bits)
            f += c_size_bits(w, FP_BITS)
            n += w.numel()
    return ModelSize(q, f, n)
