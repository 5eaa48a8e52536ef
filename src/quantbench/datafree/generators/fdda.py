"""``fdda``: class-wise BN-statistics alignment (seed 000's family; Zhong et al. 2022, zysxmu/FDDA).

FDDA aligns synthetic data with *class-conditional* BN statistics ("centres", one per class and BN layer)
besides the global ones. Its public code takes the centres from one real image per class; here the default
is data-free:

1. **centres** from the model itself: for each class, ``centre_images`` images are optimised with ``bns-ce``'s
   objective towards that class, and their batch statistics at every BN input are the class's centre;
2. **images**: batches of one class each, minimising ``CE(t) + bn_weight * BNS(global) + class_weight *
   BNS(centre of t)``.

Like ``bns-ce``, the loss sees randomly pad-cropped and flipped copies (option ``augment``), and the centres are
the statistics of such copies.

``real_centres: DATA_SPEC`` (e.g. ``cifar10:../shared/data/cifar10``) takes the centres from the first
training image of each class instead, as the public code does: that run reads real images, and the card says
so (not data-free). The generator network and the KD training of the full method are not reproduced (this
is the data-synthesis half; fine-tuning is quantbench's QAT / reconstruction).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from quantbench.datafree.bns import BNSHooks
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
from quantbench.datafree.generators.bns_ce import BNSCEGenerator, BNSCEOptions, total_variation


class FDDAOptions(AugmentOptions):
    lr: float = Field(0.1, gt=0)
    bn_weight: float = Field(1.0, ge=0)
    class_weight: float = Field(1.0, ge=0, description="weight of the class-wise BNS term (C_BNS)")
    tv_weight: float = Field(1e-3, ge=0)
    centre_images: int = Field(8, ge=1, description="synthetic images per class behind each centre")
    centre_iterations: int = Field(200, ge=0)
    real_centres: str | None = Field(None, description=(
        "DATA_SPEC: centres from one real training image per class (the public code's way; NOT data-free)"))


@register_generator
class FDDAGenerator(Generator):
    name = "fdda"
    options_type = FDDAOptions
    description = "FDDA-style class-wise BNS alignment (centres from the model itself, or one real image per class)"

    def generate(self, target: Target, n: int, seed: int, progress: bool = True) -> Generated:
        opts = self.options
        assert isinstance(opts, FDDAOptions)
        t0 = time.perf_counter()
        hooks = BNSHooks(target.model, "batch")
        aug = augmenter(target, opts, seed)
        centres, n_real = (self._real_centres(target, hooks, aug) if opts.real_centres
                           else self._synthetic_centres(target, hooks, seed, aug))
        labels = balanced_labels(n, target.num_classes, seed)
        order = torch.argsort(labels, stable=True)  # batches of one class each (class-wise statistics)
        labels = labels[order]
        batches = _class_batches(labels, opts.batch_size)

        def labels_of(b: int, size: int) -> Tensor:
            lo, hi = batches[b]
            return labels[lo:hi]

        def loss(x: Tensor, b: int) -> Tensor:
            hooks.reset()
            logits = target.model(aug(x))
            t = labels_of(b, x.shape[0]).to(x.device)
            cls = int(t[0])
            return (F.cross_entropy(logits, t) + opts.bn_weight * hooks.loss()
                    + opts.class_weight * hooks.loss(centres[cls]) + opts.tv_weight * total_variation(x))

        sizes = [hi - lo for lo, hi in batches]
        with hooks.active():
            out = optimise_images(target, sizes, opts, seed, progress, "fdda", loss, labels_of, betas=(0.5, 0.9))
        out.seconds = time.perf_counter() - t0
        out.real_images = n_real
        out.info["loss_on"] = augment_note(opts)
        out.info["centres"] = "real (one training image per class)" if n_real else (
            f"synthetic ({opts.centre_images} images per class, {opts.centre_iterations} iterations)")
        return out

    def _synthetic_centres(self, target: Target, hooks: BNSHooks, seed: int,
                           aug: Callable[[Tensor], Tensor]) -> tuple[list[list[tuple[Tensor, Tensor]]], int]:
        opts = self.options
        assert isinstance(opts, FDDAOptions)
        k = opts.centre_images
        base = BNSCEGenerator(BNSCEOptions(iterations=opts.centre_iterations, batch_size=k, lr=opts.lr,
                                           clamp=opts.clamp, bn_weight=opts.bn_weight, tv_weight=opts.tv_weight,
                                           l2_weight=0.0, tv_l1_weight=0.0, input_weight=0.0,
                                           augment=opts.augment, pad=opts.pad, flip=opts.flip))
        centres = []
        for c in range(target.num_classes):  # bns-ce's objective with every target set to class c
            one_class = torch.full((k,), c, dtype=torch.long)
            images = base.generate(target, k, seed + 1000 + c, progress=False, labels=one_class).images
            centres.append(_stats(target, hooks, aug(images.to(target.device))))
        return centres, 0

    def _real_centres(self, target: Target, hooks: BNSHooks,
                      aug: Callable[[Tensor], Tensor]) -> tuple[list[list[tuple[Tensor, Tensor]]], int]:
        opts = self.options
        assert isinstance(opts, FDDAOptions) and opts.real_centres is not None
        from quantbench.data import load_data

        if not target.mean:
            raise ValueError("fdda real_centres needs the model's input normalisation (Target.mean / std) to read "
                             "real images")
        bundle = load_data(opts.real_centres, target.mean, target.std, target.input_size)
        first: dict[int, Tensor] = {}
        for i in range(len(bundle.train)):  # type: ignore[arg-type]
            img, label = bundle.train[i]
            if int(label) not in first:
                first[int(label)] = img
            if len(first) == target.num_classes:
                break
        missing = sorted(set(range(target.num_classes)) - set(first))
        if missing:
            raise ValueError(f"fdda real_centres: the training split of {opts.real_centres} has no image of "
                             f"classes {missing}")
        return [_stats(target, hooks, aug(first[k].unsqueeze(0).to(target.device)))
                for k in range(target.num_classes)], len(first)


@torch.no_grad()
def _stats(target: Target, hooks: BNSHooks, images: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per-layer (mean, var) over a set of images at every BN input."""
    hooks.reset()
    with hooks.active():
        target.model(images.to(target.device))
    out = [(m.detach(), v.detach()) for m, v in hooks.stats]  # batch statistics (the hooks' mode)
    hooks.reset()
    return out


def _class_batches(labels: Tensor, batch: int) -> list[tuple[int, int]]:
    """Index ranges of at most ``batch`` images, each holding one class (labels sorted)."""
    out = []
    start = 0
    n = labels.numel()
    while start < n:
        cls = labels[start]
        end = start
        while end < n and labels[end] == cls and end - start < batch:
            end += 1
        out.append((start, end))
        start = end
    return out
