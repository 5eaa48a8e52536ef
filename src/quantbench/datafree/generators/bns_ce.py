"""``bns-ce``: DeepInversion-style images (Yin et al. 2020): BN statistics plus class targets and an image prior.

Loss per batch: ``CE(model(a(x)), t) + bn_weight * sum_l (||mu_l - mu_BN|| + ||var_l - var_BN||)`` (batch
statistics, as DeepInversion) ``+ tv_l1_weight * TV_l1(x) + input_weight * (||mu_x|| + ||var_x - 1||) +
tv_weight * TV(x) + l2_weight * mean(x^2)``: a sparse-edge prior strong enough to shape the images (mean/variance
matching alone leaves the first layer's responses Gaussian, where a photograph's are heavy-tailed) and the input
normalisation as a zeroth BN that keeps the contrast the prior would take away; with class targets ``t``
balanced over the classes (each class ``n / classes`` times), so the float model's predictions on the
output are balanced by construction of the objective. ``a`` is the training augmentation (random 4-pixel
pad-crop with black padding, horizontal flip; option ``augment``): the running statistics describe augmented
training images, so the BNS term compares augmented copies, and the images themselves come out like
un-augmented ones, the distribution a calibrated model is tested on (DeepInversion jitters and flips too).
Adam with betas (0.5, 0.9) as DeepInversion's code.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from quantbench.datafree.bns import BNSHooks, input_batch_loss
from quantbench.datafree.generators.base import (
    AugmentOptions,
    Generated,
    Generator,
    Target,
    augment_note,
    augmenter,
    balanced_labels,
    optimise_images,
    register_generator,
)


class BNSCEOptions(AugmentOptions):
    lr: float = Field(0.1, gt=0)
    bn_weight: float = Field(1.0, ge=0, description="weight of the BN-statistics term")
    tv_weight: float = Field(0.0, ge=0, description=(
        "smoothness prior: mean squared neighbour differences (TV-l2; the earlier objective used 1e-3)"))
    l2_weight: float = Field(1e-5, ge=0)
    tv_l1_weight: float = Field(300.0, ge=0, description=(
        "sparse-edge prior: mean absolute neighbour difference (TV-l1, DeepInversion's loss_var_l1) at a weight "
        "that competes with the BNS term; it gives the first layer's responses a photograph's heavy tails "
        "instead of Gaussian ones (0 with input_weight 0 and tv_weight 1e-3: the earlier objective)"))
    input_weight: float = Field(30.0, ge=0, description=(
        "batch channel mean 0 and variance 1 of the images: the input normalisation as the statistics of a "
        "zeroth BN (ZeroQ matches it per image)"))


def _neighbour_differences(x: Tensor) -> tuple[Tensor, Tensor]:
    """Differences of vertically and horizontally neighbouring pixels."""
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def total_variation(x: Tensor) -> Tensor:
    """Mean squared difference of horizontally and vertically neighbouring pixels."""
    dv, dh = _neighbour_differences(x)
    return (dv ** 2).mean() + (dh ** 2).mean()


def total_variation_l1(x: Tensor) -> Tensor:
    """Mean absolute difference of horizontally and vertically neighbouring pixels."""
    dv, dh = _neighbour_differences(x)
    return dv.abs().mean() + dh.abs().mean()


@register_generator
class BNSCEGenerator(Generator):
    name = "bns-ce"
    options_type = BNSCEOptions
    description = "DeepInversion-style: BN statistics + cross-entropy to balanced class targets + image prior"

    def generate(self, target: Target, n: int, seed: int, progress: bool = True,
                 labels: Tensor | None = None) -> Generated:
        """``labels`` (n class targets) replace the balanced ones (fdda makes one class at a time)."""
        opts = self.options
        assert isinstance(opts, BNSCEOptions)
        hooks = BNSHooks(target.model, "batch")
        labels = balanced_labels(n, target.num_classes, seed) if labels is None else labels
        aug = augmenter(target, opts, seed)

        def labels_of(b: int, size: int) -> Tensor:
            return labels[b * opts.batch_size:b * opts.batch_size + size]

        def loss(x: Tensor, b: int) -> Tensor:
            hooks.reset()
            logits = target.model(aug(x))
            t = labels_of(b, x.shape[0]).to(x.device)
            loss = (F.cross_entropy(logits, t) + opts.bn_weight * hooks.loss()
                    + opts.tv_weight * total_variation(x) + opts.l2_weight * (x ** 2).mean())
            if opts.tv_l1_weight:
                loss = loss + opts.tv_l1_weight * total_variation_l1(x)
            if opts.input_weight:
                loss = loss + opts.input_weight * input_batch_loss(x)
            return loss

        with hooks.active():
            out = optimise_images(target, n, opts, seed, progress, "bns-ce", loss, labels_of, betas=(0.5, 0.9))
        out.info["loss_on"] = augment_note(opts)
        return out
