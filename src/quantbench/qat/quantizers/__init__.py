"""QAT learning rules, one algorithm per module, selectable by name (``ALGORITHMS``).

Every module in this package registers its algorithm on import, so adding one means adding one file. The
interface and the registry are in :mod:`quantbench.quant.learning`.
"""

from quantbench.quant.learning import (
    ALGORITHMS,
    Algorithm,
    LearningRule,
    QuantizerContext,
    list_algorithms,
    register_algorithm,
)
from quantbench.utils.registry import import_submodules

import_submodules(__name__, __path__, skip=())

__all__ = ["ALGORITHMS", "Algorithm", "LearningRule", "QuantizerContext", "list_algorithms", "register_algorithm"]
