"""QAT fake quantizers, one algorithm per module, selectable by name (``ALGORITHMS``).

Every module in this package registers its algorithm on import, so adding one means adding one file.
"""

import importlib
import pkgutil

from quantbench.qat.quantizers.base import (
    ALGORITHMS,
    Algorithm,
    QATQuantizer,
    QuantizerContext,
    register_algorithm,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "functional"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ALGORITHMS", "Algorithm", "QATQuantizer", "QuantizerContext", "register_algorithm"]
