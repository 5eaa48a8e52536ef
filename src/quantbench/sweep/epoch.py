"""Estimate one training epoch's time: forward + backward of one batch times the number of batches."""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

TRAIN_BATCH = 64


def estimate_epoch_seconds(model: nn.Module, train: Dataset, device: str = "cpu", batch_size: int = TRAIN_BATCH,
                           repeats: int = 3) -> float:
    """Median time of a forward + backward + SGD step on one training batch, times the batches per epoch.

    Runs on a copy of the model, so the caller's weights and BatchNorm statistics are untouched.
    """
    n = len(train)  # type: ignore[arg-type]
    b = max(1, min(batch_size, n))
    items = [train[i] for i in range(b)]
    x = torch.stack([it[0] for it in items]).to(device)
    y = torch.as_tensor([it[1] for it in items], device=device)
    m = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    times = []
    for i in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first iteration warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * math.ceil(n / b)
