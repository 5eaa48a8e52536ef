"""Training batches that do not depend on how many processes share them.

The order of each epoch is :class:`torch.utils.data.DistributedSampler`'s permutation (seeded with
``seed + epoch``); a process takes every ``world``-th index, so the union of the processes' k-th batches is
the single-process k-th batch of the same global size. Augmentation (random pad-crop and flip) is drawn per
image from ``(seed, epoch)``, so an image is augmented the same way whichever process loads it, and a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from quantbench.data import TensorImageDataset
from quantbench.errors import ConfigError


def shift_flip(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, pad: int, fill: Tensor | None) -> Tensor:
    """Pad by ``pad``, crop at offsets ``(oy, ox)`` and mirror where ``flip``, per image, vectorized."""
    n, c, h, w = x.shape
    padded = x.new_empty(n, c, h + 2 * pad, w + 2 * pad)
    padded[:] = 0.0 if fill is None else fill.to(x.dtype).view(1, c, 1, 1)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    rows = oy[:, None] + torch.arange(h)[None, :]
    cols = ox[:, None] + torch.arange(w)[None, :]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(c)[None, :, None, None]
    return padded[idx_n, idx_c, rows[:, None, :, None], cols[:, None, None, :]]


class TrainBatches:
    """Per-epoch training batches of one process (``global_batch / world`` images each, last partial batch
    dropped)."""

    def __init__(self, dataset: Dataset, global_batch: int, world: int = 1, rank: int = 0, seed: int = 0,
                 augment: bool = True) -> None:
        if global_batch % world:
            raise ConfigError(f"batch_size {global_batch} must be divisible by the number of processes ({world})")
        self.dataset, self.world, self.rank, self.seed, self.augment = dataset, world, rank, seed, augment
        self.local_batch = global_batch // world
        self.n = len(dataset)  # type: ignore[arg-type]
        self.steps = (self.n // world) // self.local_batch
        if self.steps == 0:
            raise ConfigError(f"batch_size {global_batch} is larger than the {self.n} training images; lower it")

    def __len__(self) -> int:
        return self.steps

    def _sampler(self, epoch: int) -> DistributedSampler:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return sampler

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of ``epoch`` for this process."""
        sampler = self._sampler(epoch)
        ds = self.dataset
        if not isinstance(ds, TensorImageDataset):  # e.g. image folders: their own (random) transforms
            loader = DataLoader(ds, batch_size=self.local_batch, sampler=sampler, drop_last=True, num_workers=0)
            for i, (x, y) in enumerate(loader):
                if i >= self.steps:
                    return
                yield x, torch.as_tensor(y)
            return
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        pad = ds.pad
        oy = torch.randint(0, 2 * pad + 1, (self.n,), generator=g)
        ox = torch.randint(0, 2 * pad + 1, (self.n,), generator=g)
        flip = (torch.rand(self.n, generator=g) < 0.5) & ds.flip
        for k in range(self.steps):
            idx = order[k * self.local_batch:(k + 1) * self.local_batch]
            x = ds.images[idx]
            if self.augment and (pad > 0 or ds.flip):
                x = shift_flip(x, oy[idx], ox[idx], flip[idx], pad, ds.fill)
            if ds.size != ds.native_size:
                x = torch.nn.functional.interpolate(x, size=ds.size, mode="bilinear", align_corners=False)
            yield x, ds.labels[idx]
