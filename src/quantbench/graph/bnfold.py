"""The five BN-folding strategies of :class:`~quantbench.graph.qmodules.QuantWeighted` (``--bn-fold 0..4``,
seed 001 B, Fig. 10).

Every strategy evaluates (eval mode) to the BN-folded layer the backend runs: ``conv(x, W_q) + b_fold`` with
``b_fold = (b - μ_run) γ / σ_run + β``. They differ in training:

0. BN folded once with the running statistics; the folded weight and bias are trained, no BN afterwards.
1. Jacob et al. 2018: a float conv gives the batch statistics; the weight folded with the batch σ is
   quantized; the running statistics are updated.
2. Krishnamoorthi 2018: the weight is folded with the running σ; a float conv gives the batch statistics and
   the output is rescaled by ``σ_run / σ_B`` (bias from the batch mean); after ``bn_freeze_step`` steps the
   statistics freeze and the layer trains as it evaluates.
3. PyTorch's QAT ConvBn (the default, also BN re-calibration's): quantize ``W γ/σ_run``, conv, divide by
   ``γ/σ_run``, then BN with batch statistics (no extra conv); BN freezes after ``bn_freeze_step`` if given.
4. BN unfolded in training (``BN(conv(x, W_q))``); for evaluation and export the BN is folded into the
   quantized weight, ``W_q γ/σ_run`` (an integer grid with per-channel scales ``s |γ/σ_run|``).

A strategy is stateless: it reads and writes the layer it is given (its module, BN, weight quantizer, step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from quantbench.graph.qmodules import QuantWeighted

BatchNorm = nn.BatchNorm1d | nn.BatchNorm2d
DEFAULT_BN_FOLD = 3


def per_out(v: Tensor, like: Tensor) -> Tensor:
    """A per-output-channel vector shaped to broadcast over a weight (dim 0)."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def per_channel(v: Tensor, y: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over an (N, C, ...) activation."""
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


class FoldStrategy:
    """How a layer with a BN trains; every strategy evaluates to the folded layer."""

    strategy: ClassVar[int]

    @staticmethod
    def attach(layer: QuantWeighted) -> None:
        """Called once when the layer switches to this strategy."""

    @staticmethod
    def quantizer_input_factor(layer: QuantWeighted) -> Tensor | None:
        """Per-channel factor between the folded weight a PTQ calibrator saw and this strategy's quantizer
        input (None: the same tensor)."""
        return None

    @staticmethod
    def deployed_weight_bias(layer: QuantWeighted) -> tuple[Tensor, Tensor | None]:
        w, b = layer.folded_weight_bias()
        return layer.quantize_weight(w), b

    @staticmethod
    def train_forward(layer: QuantWeighted, x: Tensor) -> Tensor:
        raise NotImplementedError  # every registered strategy overrides it


class FoldOnce(FoldStrategy):
    """Strategy 0: fold BN once with the running statistics; train the folded weight and bias."""

    strategy = 0

    @staticmethod
    @torch.no_grad()
    def attach(layer: QuantWeighted) -> None:
        if layer.bn is None:
            return
        w, b = layer.folded_weight_bias()
        layer.module.weight = nn.Parameter(w.detach().clone())
        layer.module.bias = nn.Parameter(b.detach().clone())  # type: ignore[union-attr]
        layer.bn = None

    @staticmethod
    def train_forward(layer: QuantWeighted, x: Tensor) -> Tensor:  # no BN left: never called
        w, b = layer.deployed_weight_bias()
        return layer.compute(x, w, b)


class BatchStatFold(FoldStrategy):
    """Strategy 1 (Jacob et al. 2018): fold with the batch σ from an extra float conv."""

    strategy = 1

    @staticmethod
    def train_forward(layer: QuantWeighted, x: Tensor) -> Tensor:
        assert layer.bn is not None
        w = layer.module.weight
        mean, var, n = batch_stats(layer.compute(x, w, None))
        update_running_stats(layer.bn, mean + layer.conv_bias().detach(), var, n)
        f = layer.bn_factor(var)
        y = layer.compute(x, layer.quantize_weight(w * per_out(f, w)), None)
        return y + per_channel(layer.bn_beta() - mean * f, y)


class RunningStatFold(FoldStrategy):
    """Strategy 2 (Krishnamoorthi 2018): fold with the running σ, correct the output by ``σ_run / σ_B``;
    statistics freeze after ``bn_freeze_step`` steps."""

    strategy = 2

    @staticmethod
    def train_forward(layer: QuantWeighted, x: Tensor) -> Tensor:
        bn = layer.bn
        assert bn is not None and bn.running_var is not None
        if layer.frozen():
            w, b = layer.deployed_weight_bias()
            return layer.compute(x, w, b)
        w = layer.module.weight
        mean, var, n = batch_stats(layer.compute(x, w, None))
        sigma_run = torch.sqrt(bn.running_var + bn.eps)  # buffer: no gradient
        sigma_b = torch.sqrt(var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma_run)
        y = layer.compute(x, layer.quantize_weight(w * per_out(gamma / sigma_run, w)), None)
        update_running_stats(bn, mean + layer.conv_bias().detach(), var, n)
        return y * per_channel(sigma_run / sigma_b, y) + per_channel(layer.bn_beta() - gamma * mean / sigma_b, y)


class ScaledConvBn(FoldStrategy):
    """Strategy 3 (PyTorch's QAT ConvBn): quantize ``W γ/σ_run``, conv, divide by ``γ/σ_run``, BN with batch
    statistics; the BN runs on its running statistics (frozen) after ``bn_freeze_step`` steps."""

    strategy = 3

    @staticmethod
    def train_forward(layer: QuantWeighted, x: Tensor) -> Tensor:
        bn = layer.bn
        assert bn is not None
        w = layer.module.weight
        f = layer.bn_factor()
        y = layer.compute(x, layer.quantize_weight(w * per_out(f, w)), None)
        y = y / per_channel(f, y)
        if layer.module.bias is not None:
            y = y + per_channel(layer.module.bias, y)
        if layer.frozen():
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return bn(y)


class UnfoldedBn(FoldStrategy):
    """Strategy 4: ``BN(conv(x, W_q))`` in training; eval and export fold the BN into the quantized weight."""

    strategy = 4

    @staticmethod
    def quantizer_input_factor(layer: QuantWeighted) -> Tensor | None:
        if layer.bn is None:
            return None
        with torch.no_grad():
            return layer.bn_factor().abs()

    @staticmethod
    def train_forward(layer: QuantWeighted, x: Tensor) -> Tensor:
        assert layer.bn is not None
        y = layer.compute(x, layer.quantize_weight(layer.module.weight), layer.module.bias)
        return layer.bn(y)

    @staticmethod
    def deployed_weight_bias(layer: QuantWeighted) -> tuple[Tensor, Tensor | None]:
        if layer.bn is None:
            return FoldStrategy.deployed_weight_bias(layer)
        w = layer.quantize_weight(layer.module.weight)
        _, b = layer.folded_weight_bias()
        return w * per_out(layer.bn_factor(), w), b


BN_FOLD: dict[int, type[FoldStrategy]] = {c.strategy: c for c in (FoldOnce, BatchStatFold, RunningStatFold,
                                                                  ScaledConvBn, UnfoldedBn)}


def set_bn_fold(layer: QuantWeighted, strategy: int, bn_freeze_step: int | None = None) -> None:
    """Switch ``layer`` to BN-fold ``strategy`` (0 folds the BN into the weights now)."""
    layer.bn_fold = strategy
    layer.bn_freeze_step = bn_freeze_step
    BN_FOLD[strategy].attach(layer)
