"""Model zoo: CIFAR ResNets, torchvision classifiers and a small digits CNN, plus weight loading."""

from quantbench.models import cifar_resnet, small_cnn, torchvision_models  # noqa: F401  (register)
from quantbench.models.registry import MODELS, ModelEntry, build_model, get_entry, list_models, register_model
from quantbench.models.weights import load_weights, save_weights

__all__ = ["MODELS", "ModelEntry", "build_model", "get_entry", "list_models", "load_weights", "register_model",
           "save_weights"]
