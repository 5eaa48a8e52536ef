"""Model size: see :mod:`quantbench.size`, the one definition (kept here for ``quantbench.deploy`` imports)."""

from quantbench.size import LayerSize, SizeReport, c_size_bits, model_size

__all__ = ["LayerSize", "SizeReport", "c_size_bits", "model_size"]
