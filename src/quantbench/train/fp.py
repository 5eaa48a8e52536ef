"""A plain floating-point training loop (used to make the demo's digits model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.data import DataBundle, make_loader
from quantbench.utils.progress import track


def train_classifier(model: nn.Module, bundle: DataBundle, epochs: int = 30, lr: float = 0.05,
                     batch_size: int = 64, seed: int = 0, progress: bool = True) -> nn.Module:
    """SGD with momentum and cosine decay; returns the model in eval mode."""
    torch.manual_seed(seed)
    loader = make_loader(bundle.train, batch_size, shuffle=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    model.train()
    for _ in track(range(epochs), "training FP model", epochs, progress):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), torch.as_tensor(y)).backward()
            opt.step()
            sched.step()
    return model.eval()
