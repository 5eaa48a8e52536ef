"""Model size (seed 003 eq. 6, C_size): bytes of the weights at their bit-widths, biases at 32 bits."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantbench.graph.quantize import weight_layers

FP_BITS = 32


@dataclass(frozen=True)
class ModelSize:
    """Size of a prepared model's parameters in bytes, quantized and in FP32."""

    quantized_bytes: float
    fp32_bytes: float
    weight_params: int

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.quantized_bytes if self.quantized_bytes else 0.0


def model_size(gm: nn.Module) -> ModelSize:
    """C_size of a prepared model: every conv/linear weight at its quantizer's bits (32 when kept in
    float), the bias the backend runs (folded BN included) at 32 bits, and the scale and shift of each
    BatchNorm that is not folded at 32 bits."""
    qbits = fbits = 0.0
    n_weights = 0
    folded: set[int] = set()
    for _, layer in weight_layers(gm):
        w = layer.module.weight
        bits = layer.weight_quantizer.scheme.bits if layer.weight_quantizer is not None else FP_BITS
        n_bias = w.shape[0] if (layer.module.bias is not None or layer.bn is not None) else 0
        qbits += w.numel() * bits + n_bias * FP_BITS
        fbits += (w.numel() + n_bias) * FP_BITS
        n_weights += w.numel()
        if layer.bn is not None:
            folded.add(id(layer.bn))
    for m in gm.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in folded:
            qbits += 2 * m.num_features * FP_BITS
            fbits += 2 * m.num_features * FP_BITS
    return ModelSize(qbits / 8, fbits / 8, n_weights)
