"""Batch-norm statistics (BNS) of a float model and how far a batch of images is from them.

Every BatchNorm layer of a trained model stores the running mean and variance of its input over the training
data. A forward pre-hook on each BN captures the input of the current batch; :class:`BNSHooks` turns it into
the statistics the generators compare with the stored ones:

* ``per_image`` (ZeroQ): each image's channel mean and standard deviation over positions (B x C), compared
  with the running mean and ``sqrt(running_var + eps)`` as ``||.||_F^2 / B`` per layer (ZeroQ's ``own_loss``);
* ``batch`` (DeepInversion): the batch's channel mean and variance, compared as ``||.||_2`` per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from quantbench.errors import QuantbenchError

Mode = Literal["per_image", "batch"]


class NoBatchNormError(QuantbenchError):
    """The model has no BatchNorm layer: there are no statistics to generate data from."""


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BN layers with running statistics, in module order (an error naming the fix when none)."""
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        raise NoBatchNormError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics: data-free generators match "
            "BN statistics (BNS), so this model needs real calibration data (--calib-data real) or noise "
            "(--calib-data noise)")
    return bns


def channel_stats(x: Tensor, per_image: bool) -> tuple[Tensor, Tensor]:
    """Channel means and variances of an (N, C, ...) activation: per image (N, C) or over the batch (C,)."""
    dims = tuple(range(2, x.dim())) if per_image else (0, *range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


class BNSHooks:
    """Captures the input statistics of every BN during a forward and scores them against the stored ones."""

    def __init__(self, model: nn.Module, mode: Mode = "per_image") -> None:
        self.bns = batch_norms(model)
        self.mode = mode
        self.stats: list[tuple[Tensor, Tensor]] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self.stats.append(channel_stats(args[0], self.mode == "per_image"))

    @contextmanager
    def active(self) -> Iterator[BNSHooks]:
        self._handles = [bn.register_forward_pre_hook(self._hook) for bn in self.bns]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def reset(self) -> None:
        self.stats = []

    def loss(self, targets: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """The BNS loss of the last forward, summed over layers. ``targets`` (mean, var) per layer replace the
        running statistics (FDDA's class-wise centres)."""
        if len(self.stats) != len(self.bns):
            raise QuantbenchError(f"captured {len(self.stats)} BN inputs for {len(self.bns)} BN layers: run one "
                                  "forward between reset() and loss() (a BN called twice is not supported)")
        total = torch.zeros((), device=self.stats[0][0].device)
        for i, (bn, (mean, var)) in enumerate(zip(self.bns, self.stats, strict=True)):
            ref_mean, ref_var = (bn.running_mean, bn.running_var) if targets is None else targets[i]
            assert ref_mean is not None and ref_var is not None
            if self.mode == "per_image":
                n = mean.shape[0]
                total = total + ((mean - ref_mean) ** 2).sum() / n
                total = total + ((torch.sqrt(var + bn.eps) - torch.sqrt(ref_var + bn.eps)) ** 2).sum() / n
            else:
                total = total + batch_distance(mean, var, ref_mean, ref_var)
        return total


def input_loss(x: Tensor) -> Tensor:
    """ZeroQ's term for the input: per-image channel mean 0 and std 1 (the model's normalised input)."""
    mean, var = channel_stats(x, per_image=True)
    n = x.shape[0]
    return (mean ** 2).sum() / n + ((torch.sqrt(var + 1e-5) - 1) ** 2).sum() / n


def batch_distance(mean: Tensor, var: Tensor, ref_mean: Tensor | float, ref_var: Tensor | float) -> Tensor:
    """DeepInversion's distance of a batch's channel statistics from reference ones: ``||mu - mu_ref||_2 +
    ||var - var_ref||_2``."""
    return torch.linalg.vector_norm(mean - ref_mean) + torch.linalg.vector_norm(var - ref_var)


def input_batch_loss(x: Tensor) -> Tensor:
    """The input normalisation as a zeroth BN: the batch's channel statistics against mean 0, variance 1."""
    mean, var = channel_stats(x, per_image=False)
    return batch_distance(mean, var, 0.0, 1.0)
