"""Calibration algorithms (observers). Every module in this package registers itself on import,
so adding an observer means adding one file."""

from quantbench.observers.base import OBSERVERS, Observer, list_observers, register_observer
from quantbench.observers.options import ObserverOptionError, validate_observer_options
from quantbench.utils.registry import import_submodules

import_submodules(__name__, __path__, skip=("base",))


def build_observer(name: str, scheme, is_weight: bool = False, **options) -> Observer:
    """Instantiate the observer registered as ``name`` (options checked by :func:`validate_observer_options`)."""
    cls = OBSERVERS.get(name)
    return cls(scheme, is_weight=is_weight, **validate_observer_options(name, options))


__all__ = ["OBSERVERS", "Observer", "ObserverOptionError", "build_observer", "list_observers", "register_observer",
           "validate_observer_options"]
