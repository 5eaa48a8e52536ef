"""Method kinds. Every module in this package registers its kind on import (one file per kind)."""

from quantbench.sweep.methods.base import (
    METHODS,
    ContextCache,
    Method,
    MethodOutcome,
    MethodParams,
    register_method,
)
from quantbench.utils.registry import import_submodules

import_submodules(__name__, __path__, skip=("base",))

__all__ = ["METHODS", "ContextCache", "Method", "MethodOutcome", "MethodParams", "register_method"]
