"""QAT conv / linear layers and the five BN-folding strategies (``--bn-fold 0..4``, seed 001 B, Fig. 10).

Every layer evaluates (eval mode) to the BN-folded layer the backend runs: ``conv(x, W_q) + b_fold`` with
``b_fold = (b - μ_run) γ / σ_run + β``. They differ in training:

0. BN folded once with the running statistics; the folded weight and bias are trained, no BN afterwards.
1. Jacob et al. 2018: a float conv gives the batch statistics; the weight folded with the batch σ is
   quantized; the running statistics are updated.
2. Krishnamoorthi 2018: the weight is folded with the running σ; a float conv gives the batch statistics and
   the output is rescaled by ``σ_run / σ_B`` (bias from the batch mean); after ``bn_freeze_step`` steps the
   statistics freeze and the layer trains as it evaluates.
3. PyTorch's QAT ConvBn: quantize ``W γ/σ_run``, conv, divide by ``γ/σ_run``, then BN with batch statistics
   (no extra conv); BN freezes after ``bn_freeze_step`` if given.
4. BN unfolded in training (``BN(conv(x, W_q))``); for evaluation and export the BN is folded into the
   quantized weight, ``W_q γ/σ_run`` (an integer grid with per-channel scales ``s |γ/σ_run|``).
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quantbench.graph.qmodules import QuantWeighted
from quantbench.qat.quantizers.base import QATQuantizer

BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d
Layer = nn.Conv1d | nn.Conv2d | nn.Linear


def _per_out(v: Tensor, like: Tensor) -> Tensor:
    """A per-output-channel vector shaped to broadcast over a weight (dim 0) or an activation (dim 1)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _per_channel(v: Tensor, y: Tensor) -> Tensor:
    return v.reshape(1, -1, *([1] * (y.dim() - 2)))


def batch_stats(y: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean and biased variance of an (N, C, ...) activation, and the count per channel."""
    dims = [0, *range(2, y.dim())]
    var, mean = torch.var_mean(y, dim=dims, correction=0)
    return mean, var, y.numel() // y.shape[1]


@torch.no_grad()
def update_running_stats(bn: BatchNorm, mean: Tensor, var: Tensor, n: int) -> None:
    """What ``nn.BatchNorm`` does in training: EMA (or cumulative average) with the unbiased variance."""
    assert bn.running_mean is not None and bn.running_var is not None
    momentum = bn.momentum
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    m = 0.1 if momentum is None else momentum
    bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
    bn.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)


class QATWeighted(nn.Module):
    """A conv or linear layer whose weight passes through a QAT quantizer (no BN to fold)."""

    quantbench_kind = "weighted"
    strategy: ClassVar[int | None] = None

    def __init__(self, module: Layer, weight_quantizer: QATQuantizer | None, bn: BatchNorm | None = None,
                 bn_freeze_step: int | None = None) -> None:
        super().__init__()
        self.module = module
        self.weight_quantizer = weight_quantizer
        self.bn = bn
        self.bn_freeze_step = bn_freeze_step
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training steps (checkpointed)
        self._step = 0  # its host copy: no device sync per forward

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._step = int(self.step)

    @classmethod
    def from_layer(cls, layer: QuantWeighted, weight_quantizer: QATQuantizer | None,
                   bn_freeze_step: int | None = None) -> QATWeighted:
        """The QAT layer for a PTQ-prepared ``QuantWeighted`` (sharing its conv and BN modules)."""
        return cls(layer.module, weight_quantizer, layer.bn, bn_freeze_step)

    @staticmethod
    def quantizer_input_factor(layer: QuantWeighted) -> Tensor | None:
        """Per-channel factor between the folded weight the PTQ quantizer saw and this strategy's quantizer
        input (None: the same tensor)."""
        return None

    # ---------------------------------------------------------------------------------- helpers
    @property
    def is_linear(self) -> bool:
        return isinstance(self.module, nn.Linear)

    def run_layer(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        if self.is_linear:
            return F.linear(x, w, b)
        return self.module._conv_forward(x, w, b)  # type: ignore[union-attr]

    def _q(self, w: Tensor) -> Tensor:
        return self.weight_quantizer(w) if self.weight_quantizer is not None else w

    def bn_factor(self, var: Tensor | None = None) -> Tensor:
        """``γ / sqrt(var + eps)`` (running variance by default)."""
        assert self.bn is not None and self.bn.running_var is not None
        var = self.bn.running_var if var is None else var
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(var)
        return gamma / torch.sqrt(var + self.bn.eps)

    def _beta(self) -> Tensor:
        assert self.bn is not None and self.bn.running_mean is not None
        return self.bn.bias if self.bn.bias is not None else torch.zeros_like(self.bn.running_mean)

    def _conv_bias(self) -> Tensor:
        b = self.module.bias
        assert self.bn is not None and self.bn.running_mean is not None
        return b if b is not None else torch.zeros_like(self.bn.running_mean)

    def frozen(self) -> bool:
        return self.bn_freeze_step is not None and self._step >= self.bn_freeze_step

    # ---------------------------------------------------------------------------------- deployment
    def folded_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """The float weight and bias of the BN-folded layer (running statistics), before quantization."""
        w = self.module.weight
        if self.bn is None:
            return w, self.module.bias
        f = self.bn_factor()
        assert self.bn.running_mean is not None
        return w * _per_out(f, w), (self._conv_bias() - self.bn.running_mean) * f + self._beta()

    def deployed_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        """The quantized weight and the bias the backend runs (what eval mode computes with)."""
        w, b = self.folded_weight_bias()
        return self._q(w), b

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None and self.training:
            y = self.train_forward(x)
            self._step += 1
            self.step.fill_(self._step)
            return y
        w, b = self.deployed_weight_bias()
        return self.run_layer(x, w, b)

    def train_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bn_fold={self.strategy}" if self.bn is not None else ""


class FoldOnce(QATWeighted):
    """Strategy 0: fold BN once with the running statistics; train the folded weight and bias."""

    strategy = 0

    @classmethod
    def from_layer(cls, layer: QuantWeighted, weight_quantizer: QATQuantizer | None,
                   bn_freeze_step: int | None = None) -> QATWeighted:
        if layer.bn is None:
            return QATWeighted(layer.module, weight_quantizer)
        with torch.no_grad():
            w, b = layer.folded_weight_bias()
            module = copy.deepcopy(layer.module)
            module.weight = nn.Parameter(w.detach().clone())
            module.bias = nn.Parameter(b.detach().clone())  # type: ignore[union-attr]
        return QATWeighted(module, weight_quantizer)


class BatchStatFold(QATWeighted):
    """Strategy 1 (Jacob et al. 2018): fold with the batch σ from an extra float conv."""

    strategy = 1

    def train_forward(self, x: Tensor) -> Tensor:
        assert self.bn is not None
        w = self.module.weight
        mean, var, n = batch_stats(self.run_layer(x, w, None))
        update_running_stats(self.bn, mean + self._conv_bias().detach(), var, n)
        f = self.bn_factor(var)
        y = self.run_layer(x, self._q(w * _per_out(f, w)), None)
        return y + _per_channel(self._beta() - mean * f, y)


class RunningStatFold(QATWeighted):
    """Strategy 2 (Krishnamoorthi 2018): fold with the running σ, correct the output by ``σ_run / σ_B``;
    statistics freeze after ``bn_freeze_step`` steps."""

    strategy = 2

    def train_forward(self, x: Tensor) -> Tensor:
        assert self.bn is not None and self.bn.running_var is not None
        if self.frozen():
            w, b = self.deployed_weight_bias()
            return self.run_layer(x, w, b)
        w = self.module.weight
        mean, var, n = batch_stats(self.run_layer(x, w, None))
        sigma_run = torch.sqrt(self.bn.running_var + self.bn.eps)  # buffer: no gradient
        sigma_b = torch.sqrt(var + self.bn.eps)
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(sigma_run)
        y = self.run_layer(x, self._q(w * _per_out(gamma / sigma_run, w)), None)
        update_running_stats(self.bn, mean + self._conv_bias().detach(), var, n)
        return y * _per_channel(sigma_run / sigma_b, y) + _per_channel(self._beta() - gamma * mean / sigma_b, y)


class ScaledConvBn(QATWeighted):
    """Strategy 3 (PyTorch's QAT ConvBn): quantize ``W γ/σ_run``, conv, divide by ``γ/σ_run``, BN with batch
    statistics; the BN runs on its running statistics (frozen) after ``bn_freeze_step`` steps."""

    strategy = 3

    def train_forward(self, x: Tensor) -> Tensor:
        assert self.bn is not None
        w = self.module.weight
        f = self.bn_factor()
        y = self.run_layer(x, self._q(w * _per_out(f, w)), None)
        y = y / _per_channel(f, y)
        if self.module.bias is not None:
            y = y + _per_channel(self.module.bias, y)
        bn = self.bn
        if not self.frozen() and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, not self.frozen(),
                            bn.momentum if bn.momentum is not None else 0.1, bn.eps)


class UnfoldedBn(QATWeighted):
    """Strategy 4: ``BN(conv(x, W_q))`` in training; eval and export fold the BN into the quantized weight."""

    strategy = 4

    @staticmethod
    def quantizer_input_factor(layer: QuantWeighted) -> Tensor | None:
        if layer.bn is None:
            return None
        with torch.no_grad():
            return layer._bn_factor().abs()

    def train_forward(self, x: Tensor) -> Tensor:
        assert self.bn is not None
        y = self.run_layer(x, self._q(self.module.weight), self.module.bias)
        return self.bn(y)

    def deployed_weight_bias(self) -> tuple[Tensor, Tensor | None]:
        if self.bn is None:
            return super().deployed_weight_bias()
        w = self._q(self.module.weight)
        _, b = self.folded_weight_bias()
        return w * _per_out(self.bn_factor(), w), b


BN_FOLD: dict[int, type[QATWeighted]] = {c.strategy: c for c in (FoldOnce, BatchStatFold, RunningStatFold,
                                                                 ScaledConvBn, UnfoldedBn)}  # type: ignore[misc]
