"""QAT learning rules, one algorithm per module, selectable by name (``ALGORITHMS``).

Every module in this package registers its algorithm on import, so adding one means adding one file. The
interface and the registry are in :mod:`quantbench.quant.learning`.
"""

import importlib
import pkgutil

from quantbench.quant.learning import (
    ALGORITHMS,
    Algorithm,
    LearningRule,
    QuantizerContext,
    list_algorithms,
    register_algorithm,
)

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ALGORITHMS", "Algorithm", "LearningRule", "QuantizerContext", "list_algorithms", "register_algorithm"]
