"""Pareto analysis across precision and width (seed 003): size-matched widths and Def. 4.1 dominance."""

from quantbench.pareto.dominance import Verdict, dominance, front_accuracy
from quantbench.pareto.width import c_size_at, size_matched_width

__all__ = ["Verdict", "c_size_at", "dominance", "front_accuracy", "size_matched_width"]
