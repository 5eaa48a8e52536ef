"""Inference backends as data."""

from quantbench.backends.overrides import LayerOverride
from quantbench.backends.registry import backend_names, list_backends, load_backend, read_spec
from quantbench.backends.spec import BackendSpec, Placement

__all__ = ["BackendSpec", "LayerOverride", "Placement", "backend_names", "list_backends", "load_backend", "read_spec"]
