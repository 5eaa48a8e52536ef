"""A mixed-precision allocation: bits per weight layer and per activation quantizer, written as the per-layer
overrides every quantbench command reads (``ptq --overrides``, ``export``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from quantbench.backends.overrides import QUANTIZER_PREFIX, LayerOverride
from quantbench.utils.io import atomic_write_text


@dataclass
class Allocation:
    """``weights``: layer (module name) -> weight bits; ``activations``: activation quantizer name -> bits."""

    weights: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)

    def overrides(self) -> list[LayerOverride]:
        """One override per layer (``w_bits``) and per activation quantizer (``quantizer:NAME``, ``a_bits``)."""
        return ([LayerOverride(match=n, w_bits=b) for n, b in self.weights.items()]
                + [LayerOverride(match=QUANTIZER_PREFIX + n, a_bits=b) for n, b in self.activations.items()])

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "activations": dict(self.activations)}

    def write_yaml(self, path: Path, header: list[str], before: Sequence[LayerOverride] = ()) -> None:
        """The overrides as YAML (``quantbench ptq --overrides PATH``), ``header`` lines as comments; ``before``:
        the run's own overrides, which the allocation was evaluated on top of."""
        entries = [o.model_dump(exclude_none=True) for o in [*before, *self.overrides()]]
        text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump({"overrides": entries}, sort_keys=False)
        atomic_write_text(path, text)
