"""The unified QAT recipe (seed 001 A): SGD with momentum 0.9, cosine decay, per-family defaults."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantbench.errors import ConfigError
from quantbench.models import get_entry
from quantbench.utils.registry import Registry


@dataclass(frozen=True)
class FamilyDefaults:
    lr: float
    weight_decay: float  # the family's full-precision recipe


#: ``recipe(model name) -> FamilyDefaults`` for one model family (a function, so a family can treat a model apart)
FamilyRecipe = Callable[[str], FamilyDefaults]
RECIPE_FAMILIES: Registry[FamilyRecipe] = Registry[FamilyRecipe]("QAT recipe family")


def register_family(name: str) -> Callable[[FamilyRecipe], FamilyRecipe]:
    """Decorator: ``@register_family("myfamily")`` on ``def recipe(model: str) -> FamilyDefaults`` gives the
    models of family ``name`` (``ModelEntry.family``) their QAT learning rate and weight decay."""
    return RECIPE_FAMILIES.register(name)


def _fixed(name: str, lr: float, weight_decay: float) -> None:
    register_family(name)(lambda _model: FamilyDefaults(lr, weight_decay))


# learning rate from seed 001 A's grid search (ResNet family incl. RegNet 0.004, MobileNet family incl.
# EfficientNet 0.01); weight decay as each family's FP recipe
_fixed("resnet", 0.004, 1e-4)
_fixed("regnet", 0.004, 5e-5)
_fixed("densenet", 0.004, 1e-4)
_fixed("efficientnet", 0.01, 1e-5)
_fixed("shufflenet", 0.01, 4e-5)
_fixed("small", 0.004, 5e-4)


@register_family("mobilenet")
def _mobilenet(model: str) -> FamilyDefaults:
    """MobileNetV2 trains better with weight decay 1e-5 than its FP 4e-5 (seed 001 A)."""
    return FamilyDefaults(0.01, 1e-5 if model == "mobilenet_v2" else 4e-5)


def recipe_defaults(model: str) -> FamilyDefaults:
    """Learning rate and weight decay for ``model`` from its registry family's recipe."""
    family = get_entry(model).family
    if family not in RECIPE_FAMILIES:
        raise ConfigError(
            f"model {model!r} is of family {family!r}, which has no QAT recipe defaults (known families: "
            f"{', '.join(RECIPE_FAMILIES.names())}): pass --lr and --weight-decay, or register the family with "
            f"@quantbench.qat.recipe.register_family({family!r}) on a function model -> FamilyDefaults(lr, "
            "weight_decay)")
    return RECIPE_FAMILIES.get(family)(model)


def build_optimizer(model: nn.Module, quantizer_params: list[nn.Parameter], lr: float, weight_decay: float,
                    quantizer_lr: float, quantizer_weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False) -> torch.optim.SGD:
    """SGD with two parameter groups: the network's and the quantizers' (own lr and weight decay, seed 001
    B.2.3)."""
    qids = {id(p) for p in quantizer_params}
    net = [p for p in model.parameters() if p.requires_grad and id(p) not in qids]
    groups = [{"params": net, "lr": lr, "weight_decay": weight_decay, "name": "network"}]
    if quantizer_params:
        groups.append({"params": quantizer_params, "lr": quantizer_lr, "weight_decay": quantizer_weight_decay,
                       "name": "quantizers"})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay to 0 over ``total_steps`` iterations (stepped once per iteration), optional linear warmup."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def multistep_schedule(optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float = 0.1,
                       warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Step decay: lr times ``gamma`` at each of ``milestones`` (iterations; stepped once per iteration), after an
    optional linear warm-up (seed 002 Table 2's MultiSteps)."""
    marks = sorted(milestones)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return float(gamma ** sum(step >= m for m in marks))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
