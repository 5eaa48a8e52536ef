"""Conv / linear layers with a weight quantizer, optionally with a batch norm folded in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantbench.graph import requant
from quantbench.quant.quantizer import Quantizer


class QuantWeighted(nn.Module):
    """A conv or linear layer whose weight passes through ``weight_quantizer``.

    With ``bn`` (backends that fold BN) the layer computes ``conv(x, q(W * g/s)) + b_fold`` in eval
    mode, where ``g/s = gamma / sqrt(running_var + eps)`` (the folded conv the backend runs). When
    the BN is in training mode (BN re-calibration, seed 001 C.3) the output of the quantized folded
    conv is divided by ``g/s`` and passed through the BN, which then updates its running statistics
    from batch statistics (PyTorch's QAT ConvBn scheme).

    For backends simulated with ONNX Runtime's arithmetic, placement links the layer to its input and
    output quantizers (``qb_links``); at inference the bias is then quantized to int32 and, where ONNX
    Runtime fuses the layer into an integer kernel, the output is computed as that kernel does
    (:mod:`quantbench.graph.requant`).
    """

    quantbench_kind = "weighted"

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Linear, weight_quantizer: Quantizer | None,
                 bn: nn.BatchNorm1d | nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        self.module = module
        self.weight_quantizer = weight_quantizer
        self.bn = bn

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    def _bn_factor(self) -> Tensor:
        assert self.bn is not None and self.bn.running_var is not None
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(self.bn.running_var)
        return gamma / torch.sqrt(self.bn.running_var + self.bn.eps)

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """The weight and bias the backend runs (BN folded in when present)."""
        w, b = self.module.weight, self.module.bias
        if self.bn is None:
            return w, b
        assert self.bn.running_mean is not None
        f = self._bn_factor()
        w = w * f.reshape(-1, *([1] * (w.dim() - 1)))
        beta = self.bn.bias if self.bn.bias is not None else torch.zeros_like(f)
        b0 = b if b is not None else torch.zeros_like(f)
        return w, (b0 - self.bn.running_mean) * f + beta

    def quantized_weight(self) -> Tensor:
        w, _ = self.folded_weight_bias()
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def _compute(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.is_linear:
            return F.linear(x, w, b)
        return self.module._conv_forward(x, w, b)  # type: ignore[union-attr]

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None and self.bn.training:
            w, _ = self.folded_weight_bias()
            wq = self.weight_quantizer(w) if self.weight_quantizer is not None else w
            f = self._bn_factor().detach()
            y = self._compute(x, wq, None) / f.reshape(1, -1, *([1] * (x.dim() - 2)))
            if self.module.bias is not None:
                y = y + self.module.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
            return self.bn(y)
        w, b = self.folded_weight_bias()
        if self.weight_quantizer is not None:
            w = self.weight_quantizer(w)
            if getattr(self, "qb_links", None) is not None and requant.integer_mode():
                return requant.weighted_forward(self, x, w, b)
        return self._compute(x, w, b)

    def extra_repr(self) -> str:
        return "bn folded" if self.bn is not None else ""
