"""DDP: one process per GPU (NCCL) or CPU process (gloo), launched by ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (in place; the same tensor back with one process)."""
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_distributed(device: str) -> DistContext:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), or run as a single process.

    NCCL on CUDA, gloo on CPU; each process uses GPU ``LOCAL_RANK``.
    """
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1))))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    return DistContext(rank, world, dev)


def wrap_ddp(model: nn.Module, ctx: DistContext, find_unused: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when several processes train it (parameters and buffers
    start from rank 0's; buffers such as BN statistics are broadcast from rank 0 at each forward).
    ``find_unused``: some parameters may get no gradient in a step (CoQuant's Swap leaves a block's BN unused)."""
    if ctx.world == 1:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused)
