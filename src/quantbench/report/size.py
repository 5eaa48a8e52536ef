"""Model size of a prepared model for the report and the cards: see :mod:`quantbench.size` (seed 003 eq. 6)."""

from quantbench.size import FP_BITS, ModelSize
from quantbench.size import prepared_size as model_size

__all__ = ["FP_BITS", "ModelSize", "model_size"]
