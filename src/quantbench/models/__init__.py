"""Model zoo: CIFAR ResNets, seed 003's CIFAR models (VGG11 A/B/C, Inv-ResNet26, MobileNetV2-CIFAR), torchvision
classifiers, a small digits CNN and any timm classifier (``timm:NAME``), plus weight loading."""

from quantbench.models import (  # noqa: F401  (register)
    cifar_resnet,
    seed003_models,
    small_cnn,
    timm_models,
    torchvision_models,
)
from quantbench.models.registry import (
    MODEL_SOURCES,
    MODELS,
    ModelEntry,
    build_model,
    get_entry,
    list_models,
    register_model,
    register_model_source,
)
from quantbench.models.weights import load_weights, save_weights

__all__ = [
    "MODELS",
    "MODEL_SOURCES",
    "ModelEntry",
    "build_model",
    "get_entry",
    "list_models",
    "load_weights",
    "register_model",
    "register_model_source",
    "save_weights",
]
