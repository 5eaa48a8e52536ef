"""Top-1 accuracy and top-1 agreement between a float and a quantized model."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quantbench.utils.progress import track


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
            progress: bool = True, description: str = "evaluating") -> tuple[Tensor, Tensor]:
    """Predicted classes and labels over ``loader`` (CPU tensors)."""
    model.eval()
    preds, labels = [], []
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    for x, y in track(loader, description, total, progress):
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(preds), torch.cat(labels)


@dataclass
class EvalResult:
    fp_top1: float  # percent
    quant_top1: float  # percent
    agreement: float  # fraction 0-1 of images whose predicted class is unchanged
    n: int


def compare(fp_pred: Tensor, q_pred: Tensor, labels: Tensor) -> EvalResult:
    """Top-1 of both predictions and their agreement."""
    n = labels.numel()
    return EvalResult(
        fp_top1=100.0 * (fp_pred == labels).float().mean().item(),
        quant_top1=100.0 * (q_pred == labels).float().mean().item(),
        agreement=(fp_pred == q_pred).float().mean().item(),
        n=n,
    )
