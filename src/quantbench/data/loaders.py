"""In-memory image datasets, vectorized augmentation, calibration subsets and DataLoaders."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from quantbench.errors import ConfigError, DataError, EmptyCalibrationError

if TYPE_CHECKING:
    from quantbench.data.registry import DataBundle


class CalibrationSizeError(DataError, EmptyCalibrationError):
    """The requested calibration subset is empty or larger than the training set."""


def normalize_images(raw: torch.Tensor, mean: Sequence[float], std: Sequence[float], scale: float) -> torch.Tensor:
    """``(raw * scale - mean) / std`` per channel for an (N, C, H, W) tensor, as float32."""
    c = raw.shape[1]
    if len(mean) != c or len(std) != c:
        raise ConfigError(f"mean/std have {len(mean)}/{len(std)} entries but the images have {c} channels")
    if any(s <= 0 for s in std):
        raise ConfigError(f"std must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    return ((raw.to(torch.float32) * scale - m) / s).contiguous()


def augment_batch(
    x: torch.Tensor,
    pad: int = 4,
    flip: bool = True,
    fill: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random ``pad``-pixel crop and (optionally) horizontal flip of an (N, C, H, W) batch, vectorized.

    ``fill`` (shape (C,)) is the value of the padding, e.g. the normalized value of a black pixel.
    """
    n, c, h, w = x.shape
    if pad > 0:
        padded = x.new_empty(n, c, h + 2 * pad, w + 2 * pad)
        padded[:] = 0.0 if fill is None else fill.to(x.dtype).view(1, c, 1, 1)
        padded[:, :, pad : pad + h, pad : pad + w] = x
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    else:
        padded = x
        oy = ox = torch.zeros(n, dtype=torch.long)
    rows = oy[:, None] + torch.arange(h)[None, :]  # (N, H)
    cols = ox[:, None] + torch.arange(w)[None, :]  # (N, W)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(c)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


class TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Precomputed normalized float32 images (N, C, H, W) and int labels held in memory.

    ``size`` (H, W) resizes each image bilinearly on access when it differs from the stored size
    (normalization is affine per channel, so it commutes with the resize). ``augment`` applies a
    random ``pad``-crop (+ horizontal flip when ``flip``) per item; ``fill`` is the normalized value of
    a black pixel used for padding.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        size: tuple[int, int] | None = None,
        augment: bool = False,
        pad: int = 4,
        flip: bool = True,
        fill: torch.Tensor | None = None,
    ) -> None:
        if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.long)
        self.native_size: tuple[int, int] = (int(images.shape[2]), int(images.shape[3]))
        self.size: tuple[int, int] = self.native_size if size is None else (int(size[0]), int(size[1]))
        self.augment, self.pad, self.flip, self.fill = augment, pad, flip, fill

    @classmethod
    def from_raw(
        cls,
        raw: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float,
        size: tuple[int, int] | None = None,
        augment: bool = False,
        pad: int = 4,
        flip: bool = True,
    ) -> TensorImageDataset:
        """Normalize raw pixels (``raw * scale`` in [0, 1]) with ``mean``/``std`` in one vectorized pass."""
        images = normalize_images(raw, mean, std, scale)
        fill = -torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)
        return cls(images, labels, size=size, augment=augment, pad=pad, flip=flip, fill=fill)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, indices: torch.Tensor | Sequence[int] | slice | None = None) -> torch.Tensor:
        """Images for ``indices`` (all when None) as one tensor, augmented/resized like ``__getitem__``."""
        x = self.images if indices is None else self.images[indices]
        if self.augment:
            x = augment_batch(x, self.pad, self.flip, self.fill)
        if self.size != self.native_size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(normalized image (C, H, W) float32, label)``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} images")
        i %= n
        return self.batch(slice(i, i + 1))[0], int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by ``DataLoader``: one vectorized augment/resize per batch."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return list(zip(self.batch(idx).unbind(0), self.labels[idx].tolist(), strict=True))

    def subset(self, indices: Sequence[int], augment: bool | None = None) -> TensorImageDataset:
        """A new dataset holding copies of rows ``indices`` (``augment`` None keeps the setting)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImageDataset(
            self.images[idx],
            self.labels[idx],
            size=self.size,
            augment=self.augment if augment is None else augment,
            pad=self.pad,
            flip=self.flip,
            fill=self.fill,
        )


def calibration_subset(bundle: DataBundle, n: int, seed: int = 0, augment: bool = False
                       ) -> Dataset[tuple[torch.Tensor, int]]:
    """``n`` training images for calibration: un-augmented, or with ``augment`` under the training augmentation
    (BN calibration wants the distribution BN was trained on): in-memory sets get their random crop / flip;
    image folders keep the bundle's own transform, so load that bundle with ``augment=True``.

    The first ``n`` of ``bundle.calib_indices`` when the bundle has them and ``n`` fits, otherwise a
    sorted seeded ``numpy.random.default_rng(seed).choice`` of ``n`` distinct training indices (with
    seed 0 and n=256 on the CIFAR-10 subset this reproduces calib_train_indices_256.json).
    """
    total = len(bundle.train)  # type: ignore[arg-type]
    if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
        raise CalibrationSizeError(f"calibration needs at least 1 image, got n={n!r}; pass n >= 1")
    if n > total:
        raise CalibrationSizeError(
            f"asked for {n} calibration images but the {bundle.name} training set has only {total}; pass n <= {total}"
        )
    if bundle.calib_indices is not None and n <= len(bundle.calib_indices):
        indices = [int(i) for i in bundle.calib_indices[:n]]
    else:
        indices = sorted(int(i) for i in np.random.default_rng(seed).choice(total, size=n, replace=False))
    if isinstance(bundle.train, TensorImageDataset):
        return bundle.train.subset(indices, augment=augment)
    return Subset(bundle.train, indices)


def make_loader(
    ds: Dataset[tuple[torch.Tensor, int]], batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader[tuple[torch.Tensor, int]]:
    """A single-process DataLoader; shuffling is reproducible through a generator seeded with ``seed``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0)
