"""Calibration algorithms (observers). Every module in this package registers itself on import,
so adding an observer means adding one file."""

import importlib
import pkgutil

from quantbench.observers.base import OBSERVERS, Observer, list_observers, register_observer

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def build_observer(name: str, scheme, is_weight: bool = False, **options) -> Observer:
    """Instantiate the observer registered as ``name``."""
    return OBSERVERS.get(name)(scheme, is_weight=is_weight, **options)


__all__ = ["OBSERVERS", "Observer", "build_observer", "list_observers", "register_observer"]
