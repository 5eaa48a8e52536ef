"""The generator interface, its registry and the optimisation loop the BNS generators share."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from quantbench.errors import ConfigError
from quantbench.utils.progress import LossBar
from quantbench.utils.registry import Registry


class GeneratorOptions(BaseModel):
    """Options every image-optimising generator has (ZeroQ's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    iterations: int = Field(500, ge=0, description="optimisation steps per batch")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.5, gt=0)
    clamp: bool = Field(True, description=(
        "after every step, clip each pixel to what a real image can be after normalisation, "
        "[(0 - mean) / std, (1 - mean) / std] per channel (DeepInversion's clipping); needs the model's "
        "input normalisation"))


class AugmentOptions(GeneratorOptions):
    """Options of generators that match *batch* statistics: the training augmentation the statistics describe."""

    augment: bool = Field(True, description=(
        "compute the loss on randomly padded-cropped (black padding) and flipped copies of the images, the "
        "training augmentation the BN statistics were collected under, so that the images themselves look "
        "like un-augmented inputs (the test distribution)"))
    pad: int = Field(4, ge=0, description="crop padding in pixels (the CIFAR recipe's 4)")
    flip: bool = Field(True, description="random horizontal flips")

    @property
    def augments(self) -> bool:
        """Whether the loss sees anything but the images themselves."""
        return self.augment and (self.pad > 0 or self.flip)


@dataclass
class Generated:
    """Images (N, C, H, W) normalised like the model's input, the class each was made for (or None), the
    generation time, the loss per step (mean over batches), and how many real images went into it."""

    images: Tensor
    labels: Tensor | None
    seconds: float
    loss_curve: list[float] = field(default_factory=list)
    real_images: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """What a generator makes data for: the float model, its input size and class count, and the device."""

    model: nn.Module
    input_size: tuple[int, int, int]
    num_classes: int
    device: torch.device
    mean: tuple[float, ...] = ()  # the input normalisation (for generators that read real images)
    std: tuple[float, ...] = ()


class Generator:
    """Makes ``n`` images for a float model. Subclasses: :meth:`generate`."""

    name: ClassVar[str] = ""
    options_type: ClassVar[type[BaseModel]] = GeneratorOptions
    description: ClassVar[str] = ""

    def __init__(self, options: BaseModel) -> None:
        self.options = options

    def generate(self, target: Target, n: int, seed: int, progress: bool = True) -> Generated:
        """``n`` images; ``Generated.real_images`` says how many real images went into them."""
        raise NotImplementedError


GENERATORS: Registry[type[Generator]] = Registry("data generator")


def register_generator(cls: type[Generator]) -> type[Generator]:
    GENERATORS.add(cls.name, cls)
    return cls


def build_generator(name: str, options: dict[str, Any] | None = None) -> Generator:
    cls = GENERATORS.get(name)
    return cls(cls.options_type.model_validate(options or {}))


def batch_sizes(n: int, batch: int) -> list[int]:
    """``n`` images in batches of ``batch`` (the last one smaller)."""
    return [min(batch, n - i) for i in range(0, n, batch)]


def optimise_images(target: Target, n: int | list[int], opts: GeneratorOptions, seed: int, progress: bool,
                    description: str, batch_loss: Callable[[Tensor, int], Tensor],
                    labels_of: Callable[[int, int], Tensor] | None, betas: tuple[float, float] = (0.9, 0.999),
                    plateau: bool = True) -> Generated:
    """Batch by batch (``n`` images in batches of ``opts.batch_size``, or the given batch sizes): start from
    Gaussian noise (seeded), minimise ``batch_loss(x, batch_index)`` over the pixels with Adam
    (``ReduceLROnPlateau``, min lr 1e-4, patience 100, as ZeroQ), return the images."""
    sizes = batch_sizes(n, opts.batch_size) if isinstance(n, int) else list(n)
    bounds = pixel_bounds(target) if opts.clamp else None
    model = target.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    labels: list[Tensor] = []
    curve = torch.zeros(opts.iterations)
    t0 = time.perf_counter()
    batch_seconds: list[float] = []
    n_batches = len(sizes)
    with LossBar(n_batches, description, enabled=progress) as bar:
        for b, size in enumerate(sizes):
            x = torch.randn(size, *target.input_size, generator=gen).to(target.device).requires_grad_(True)
            if labels_of is not None:
                labels.append(labels_of(b, size))
            opt = torch.optim.Adam([x], lr=opts.lr, betas=betas)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=1e-4, patience=100) if plateau else None
            bar.start(f"batch {b + 1}/{n_batches}", opts.iterations)
            for it in range(opts.iterations):
                opt.zero_grad(set_to_none=True)
                loss = batch_loss(x, b)
                loss.backward()
                opt.step()
                if bounds is not None:
                    with torch.no_grad():
                        x.clamp_(bounds[0], bounds[1])
                value = float(loss.detach())
                if sched is not None:
                    sched.step(value)
                curve[it] += value / n_batches
                if it % 25 == 0 or it == opts.iterations - 1:
                    bar.update(it + 1, value)
            bar.advance()
            out.append(x.detach().cpu())
            batch_seconds.append(round(time.perf_counter() - t0 - sum(batch_seconds), 3))
    info: dict[str, Any] = {"batch_seconds": batch_seconds}
    if bounds is not None:
        info["pixel_range"] = [[round(float(v), 4) for v in b.flatten()] for b in bounds]
    return Generated(torch.cat(out), torch.cat(labels).cpu() if labels else None, time.perf_counter() - t0,
                     [round(float(v), 6) for v in curve], info=info)


def augmenter(target: Target, opts: GeneratorOptions, seed: int) -> Callable[[Tensor], Tensor]:
    """What the loss sees of a batch: the batch itself, or (``AugmentOptions.augment``) a seeded random pad-crop
    and flip of it with black padding (the data pipeline's :func:`augment_batch`), as the training pipeline made
    the images the BN statistics come from. Differentiable in the pixels; the draws come from a CPU generator, so
    every device makes the same images."""
    if not isinstance(opts, AugmentOptions) or not opts.augments:
        return lambda x: x
    from quantbench.data.loaders import augment_batch

    if not target.mean or not target.std:
        raise ConfigError("the generator's augment option pads with black pixels, which needs the model's input "
                          "normalisation (mean / std); pass it, or set the synthetic option augment: false")
    black = pixel_bounds(target)[0].flatten().expand(target.input_size[0])  # one value per input channel
    gen = torch.Generator().manual_seed(seed + 7919)
    return lambda x: augment_batch(x, opts.pad, opts.flip, black.to(x.device), gen)


def augment_note(opts: GeneratorOptions) -> str:
    """What the loss saw of the images, for the card."""
    if not isinstance(opts, AugmentOptions) or not opts.augments:
        return "the images as they are"
    parts = ([f"random {opts.pad}-pixel pad-crop (black padding)"] if opts.pad else []) + (
        ["horizontal flip"] if opts.flip else [])
    return "augmented copies: " + " + ".join(parts)


def pixel_bounds(target: Target) -> tuple[Tensor, Tensor]:
    """Per-channel (1, C, 1, 1) bounds of a normalised image whose pixels lie in [0, 1]."""
    if not target.mean or not target.std:
        raise ConfigError("the generator clips images to the valid pixel range (option clamp) but the model's "
                          "input normalisation (mean / std) is unknown; pass it, or set the synthetic option "
                          "clamp: false")
    mean = torch.tensor(target.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(target.std, dtype=torch.float32).view(1, -1, 1, 1)
    if mean.shape[1] != target.input_size[0] and mean.shape[1] != 1:
        raise ConfigError(f"the input normalisation has {mean.shape[1]} channels but the model takes "
                          f"{target.input_size[0]}")
    return ((0 - mean) / std).to(target.device), ((1 - mean) / std).to(target.device)


def balanced_labels(n: int, num_classes: int, seed: int) -> Tensor:
    """``n`` class targets, each class ``n / num_classes`` times (±1), in a seeded random order."""
    base = torch.arange(n) % num_classes
    return base[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))]
