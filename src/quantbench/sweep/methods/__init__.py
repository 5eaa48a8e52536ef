"""Method kinds. Every module in this package registers its kind on import (one file per kind)."""

import importlib
import pkgutil

from quantbench.sweep.methods.base import (
    METHODS,
    ContextCache,
    Method,
    MethodOutcome,
    MethodParams,
    register_method,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "ContextCache", "Method", "MethodOutcome", "MethodParams", "register_method"]
