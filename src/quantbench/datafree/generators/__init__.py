"""Data generators, one file each (``noise``, ``zeroq``, ``bns-ce``, ``fdda``), registered on import."""

import importlib
import pkgutil

from quantbench.datafree.generators.base import (
    GENERATORS,
    Generated,
    Generator,
    GeneratorOptions,
    Target,
    build_generator,
    register_generator,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["GENERATORS", "Generated", "Generator", "GeneratorOptions", "Target", "build_generator",
           "register_generator"]
