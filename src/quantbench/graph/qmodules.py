"""The one quantized conv / linear layer: a weight quantizer, optionally a batch norm to fold, and the ONNX
Runtime kernel it runs as."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantbench.errors import QuantbenchError
from quantbench.graph import requant
from quantbench.graph.bnfold import BN_FOLD, DEFAULT_BN_FOLD, per_out
from quantbench.quant.quantizer import Quantizer

GRID_TOLERANCE = 1e-3  # in units of the step: a baked weight this close to a grid point is on it


class QuantWeighted(nn.Module):
    """A conv or linear layer whose weight passes through ``weight_quantizer``.

    With ``bn`` (backends that fold BN) the layer evaluates ``conv(x, q(W * g/s)) + b_fold``, with
    ``g/s = gamma / sqrt(running_var + eps)`` (the folded conv the backend runs). In training mode the BN-fold
    strategy ``bn_fold`` (:mod:`quantbench.graph.bnfold`, seed 001 B) decides how batch statistics enter; the
    default (3, PyTorch's QAT ConvBn) is also what BN re-calibration (seed 001 C.3) runs.

    For backends simulated with ONNX Runtime's arithmetic, ``links`` (set by :mod:`quantbench.graph.linking`)
    names the layer's input and output quantizers; at inference the bias is then quantized to int32 and, where
    ONNX Runtime fuses the layer into an integer kernel, the output is computed as that kernel does
    (:mod:`quantbench.graph.requant`).
    """

    quantbench_kind = "weighted"

    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Linear, weight_quantizer: Quantizer | None,
                 bn: nn.BatchNorm1d | nn.BatchNorm2d | None = None) -> None:
        super().__init__()
        self.module = module
        self.weight_quantizer = weight_quantizer
        self.bn = bn
        self.bn_fold = DEFAULT_BN_FOLD
        self.bn_freeze_step: int | None = None
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training steps (checkpointed)
        self._step = 0  # its host copy: no device sync per forward
        self.links: requant.Links | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)

    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    # ------------------------------------------------------------------ BN folding
    def bn_factor(self, var: Tensor | None = None) -> Tensor:
        """``γ / sqrt(var + eps)`` (the running variance by default)."""
        assert self.bn is not None and self.bn.running_var is not None
        var = self.bn.running_var if var is None else var
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(var)
        return gamma / torch.sqrt(var + self.bn.eps)

    def bn_beta(self) -> Tensor:
        assert self.bn is not None and self.bn.running_mean is not None
        return self.bn.bias if self.bn.bias is not None else torch.zeros_like(self.bn.running_mean)

    def conv_bias(self) -> Tensor:
        """The layer's own bias (zeros without one), for folding."""
        assert self.bn is not None and self.bn.running_mean is not None
        b = self.module.bias
        return b if b is not None else torch.zeros_like(self.bn.running_mean)

    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """The float weight and bias the backend runs (BN folded in with the running statistics)."""
        w, b = self.module.weight, self.module.bias
        if self.bn is None:
            return w, b
        assert self.bn.running_mean is not None
        f = self.bn_factor()
        return w * per_out(f, w), (self.conv_bias() - self.bn.running_mean) * f + self.bn_beta()

    def quantize_weight(self, w: Tensor) -> Tensor:
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def deployed_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """The quantized weight and the bias evaluation runs with (the BN-fold strategy decides)."""
        return BN_FOLD[self.bn_fold].deployed_weight_bias(self)

    def quantized_weight(self) -> Tensor:
        return self.deployed_weight_bias()[0]

    def frozen(self) -> bool:
        """Whether the BN statistics are frozen (``bn_freeze_step`` training steps have run)."""
        return self.bn_freeze_step is not None and self._step >= self.bn_freeze_step

    def compute(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.is_linear:
            return F.linear(x, w, b)
        return self.module._conv_forward(x, w, b)  # type: ignore[union-attr]

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None and self.bn.training:  # QAT, or BN re-calibration (only the BNs train)
            y = BN_FOLD[self.bn_fold].train_forward(self, x)
            self._step += 1
            self.step.fill_(self._step)
            return y
        w, b = self.deployed_weight_bias()
        if self.weight_quantizer is not None and self.links is not None and requant.integer_mode():
            return requant.weighted_forward(self, x, w, b)
        return self.compute(x, w, b)

    # ------------------------------------------------------------------ learning -> static
    @torch.no_grad()
    def bake(self) -> None:
        """Replace a learning weight quantizer by the static grid it learned, with the BN folded for good.

        The layer then evaluates exactly as before (the deployed weight is on the baked grid), as a PTQ layer
        that exports; a deployed weight off every candidate grid is refused rather than re-rounded.
        """
        wq = self.weight_quantizer
        if wq is None or wq.rule is None:
            return
        w, b = self.deployed_weight_bias()
        qp = wq.rule.export_qparams()
        if qp is None:
            why = wq.rule.grid_refusal() or "has non-uniform levels"
            raise QuantbenchError(f"{wq.name}: learning rule {wq.rule.algorithm!r} {why}; no integer runtime "
                                  "executes them, so it cannot be baked or exported")
        scale = qp[0].reshape(-1)
        candidates = [scale]
        if self.bn is not None and scale.numel() == w.shape[0]:
            candidates.append(scale * self.bn_factor().abs())  # BN folded after quantizing (strategy 4)
        on_grid = next((s for s in candidates if _on_grid(w, s)), None)
        if on_grid is None:
            raise QuantbenchError(f"{wq.name}: the deployed weight is not on its quantizer's grid, so baking it "
                                  "would re-round trained weights")
        wq.bake(on_grid)
        self.module.weight = nn.Parameter(w.detach().clone())
        if b is not None:
            self.module.bias = nn.Parameter(b.detach().clone())
        self.bn = None
        self.bn_fold = DEFAULT_BN_FOLD

    def extra_repr(self) -> str:
        return f"bn folded, strategy {self.bn_fold}" if self.bn is not None else ""


def _on_grid(w: Tensor, scale: Tensor) -> bool:
    s = scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    r = w / s
    return bool(((r - torch.round(r)).abs() <= GRID_TOLERANCE).all())
