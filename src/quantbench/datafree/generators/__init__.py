"""Data generators, one file each (``noise``, ``zeroq``, ``bns-ce``, ``fdda``), registered on import."""

from quantbench.datafree.generators.base import (
    GENERATORS,
    Generated,
    Generator,
    GeneratorOptions,
    Target,
    build_generator,
    register_generator,
)
from quantbench.utils.registry import import_submodules

import_submodules(__name__, __path__, skip=("base",))

__all__ = ["GENERATORS", "Generated", "Generator", "GeneratorOptions", "Target", "build_generator",
           "register_generator"]
