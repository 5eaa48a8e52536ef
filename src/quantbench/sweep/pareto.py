"""A sweep's ``pareto:`` section (seed 003): precision fronts across widths and the DualPrecision grid.

``widths`` runs every model entry at each width multiplier, so each weight precision of the sweep's ``bits`` gives a
front of (C_size, top-1) points. ``dual_precision`` trains the models with depthwise convs at every pair (depthwise
bits, other bits) of ``bits`` with the width of each cell chosen so its C_size matches the reference model's (the
``reference.width`` x model at ``reference.bits`` everywhere; seed 003 section 6: 0.25x at 8 bits), within
``tolerance``. ``quantbench pareto`` then picks the best pair and runs it at ``dual_precision.widths`` (the pair's
size curve). Each run's config carries ``pareto: {role, ...}`` so the report can draw fronts, the grid and Def. 4.1's
verdicts.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantbench.errors import ConfigError, SweepError
from quantbench.models import build_model, get_entry
from quantbench.size import FP_BITS, depthwise_layers

if TYPE_CHECKING:
    from quantbench.backends import BackendSpec
    from quantbench.sweep.expand import Combination
    from quantbench.sweep.load import Sweep

FRONT, DUAL, DUAL_FRONT = "front", "dual", "dual-front"
DEPTHWISE = "depthwise"


class Reference(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: float = Field(0.25, gt=0, description="width multiplier of the reference model")
    bits: int = Field(8, ge=1, le=16, description="its weight bits, every layer")


class DualPrecisionSection(BaseModel):
    """Seed 003 section 6's DualPrecision search."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[str] | None = Field(None, description="model names of the sweep to search (default: every model "
                                                        "entry with depthwise convs)")
    bits: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1, description="the set B of bits")
    reference: Reference = Field(default_factory=Reference)
    tolerance: float = Field(0.02, gt=0, lt=1, description="relative C_size tolerance of each cell's width")
    widths: list[float] = Field(default_factory=list, description="widths the best pair is run at "
                                                                  "(quantbench pareto's second step)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if not 1 <= b <= 8]
        if bad:
            raise ValueError(f"DualPrecision bits must be in 1..8 (exportable weights), got {bad}")
        return sorted(set(v))


class ParetoSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    widths: list[float] = Field(default_factory=list, description="width multipliers every model entry is run at")
    dual_precision: DualPrecisionSection | None = None

    @field_validator("widths")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(w <= 0 for w in v):
            raise ValueError(f"widths must be > 0, got {v}")
        return sorted(set(v))


def tag(role: str, **facts: Any) -> dict[str, Any]:
    """The ``pareto`` entry of a run's config."""
    return {"pareto": {"role": role, **facts}}


def _builder(model: str, num_classes: int) -> Callable[[float], Any]:
    return lambda w: build_model(model, None, w, num_classes=num_classes)


def _first_last_bits(spec: BackendSpec, bits: int) -> int:
    fl = spec.first_last_bits(bits)
    return FP_BITS if fl is None else fl


def matched_width(model: str, num_classes: int, spec: BackendSpec, ref: Reference, depthwise_bits: int,
                  other_bits: int, tolerance: float) -> tuple[float, int, int]:
    """``(width, its C_size, the target C_size)`` for one DualPrecision cell (bits)."""
    from quantbench.pareto.width import c_size_at, size_matched_width

    build = _builder(model, num_classes)
    size = get_entry(model).input_size
    target = c_size_at(build, ref.width, ref.bits, size, _first_last_bits(spec, ref.bits), ref.bits)
    width, got = size_matched_width(build, target, other_bits, size, _first_last_bits(spec, other_bits), tolerance,
                                    depthwise_bits=depthwise_bits)
    return width, got, target


def dual_models(sweep: Sweep) -> list[str]:
    """The models the DualPrecision grid runs on (refused: a named model without depthwise convs)."""
    dp = sweep.spec.pareto.dual_precision if sweep.spec.pareto else None
    if dp is None:
        return []
    names = list(dict.fromkeys(m.model for m in sweep.spec.models))
    with_dw = [n for n in names if depthwise_layers(build_model(n, None, 1.0))]
    if dp.models is None:
        return with_dw
    for n in dp.models:
        if n not in names:
            raise SweepError(f"pareto.dual_precision.models names {n!r}, which is not among the sweep's models "
                             f"({', '.join(names)})")
        if n not in with_dw:
            raise SweepError(f"pareto.dual_precision.models: {n!r} has no depthwise convs, so DualPrecision "
                             "(depthwise bits vs the others) does not apply; models with them here: "
                             f"{', '.join(with_dw) or 'none'}")
    return list(dp.models)


def _dual_cell(c: Combination, spec: BackendSpec, dp: DualPrecisionSection, d: int, o: int, role: str,
               width: float | None = None) -> Combination:
    from dataclasses import replace

    from quantbench.sweep.schema import Bits

    if width is None:
        try:
            width, got, target = matched_width(c.model.model, _num_classes(c), spec, dp.reference, d, o, dp.tolerance)
        except ConfigError as exc:
            return replace(c, bits=Bits(w=o, a=c.bits.a), invalid=f"DualPrecision cell depthwise {d} / other {o} "
                           f"bits: {exc}", extra=tag(role, depthwise_bits=d, other_bits=o))
        facts: dict[str, Any] = {"target_c_size_bits": target, "c_size_bits": got,
                                 "reference": dp.reference.model_dump()}
    else:
        facts = {}
    extra = {"overrides": [{"match": DEPTHWISE, "w_bits": d}],
             **tag(role, depthwise_bits=d, other_bits=o, **facts)}
    return replace(c, model=c.model.model_copy(update={"width_mult": width}), bits=Bits(w=o, a=c.bits.a),
                   extra=extra)


def _num_classes(c: Combination) -> int:
    """The registry's class count (widths are matched before the data is loaded; each run records the C_size it
    measures on its own graph, which is what the report plots)."""
    return get_entry(c.model.model).num_classes


def front_combinations(sweep: Sweep, base: list[Combination]) -> list[Combination]:
    """``base`` (the sweep's product) at every width of ``pareto.widths``, tagged as front points."""
    from dataclasses import replace

    p = sweep.spec.pareto
    if p is None:
        return base
    widths = p.widths or [None]
    return [replace(c, model=c.model if w is None else c.model.model_copy(update={"width_mult": w}),
                    extra={**c.extra, **tag(FRONT)}) for c in base for w in widths]


def dual_combinations(sweep: Sweep, base: list[Combination], resolve: Callable[[Combination], BackendSpec],
                      best: dict[tuple[str, str], tuple[int, int]] | None = None) -> list[Combination]:
    """The DualPrecision grid (``best`` None) or, given the best pair per (model, method label), its size curve."""
    dp = sweep.spec.pareto.dual_precision if sweep.spec.pareto else None
    if dp is None:
        return []
    models = set(dual_models(sweep))
    seen: set[tuple[Any, ...]] = set()
    out = []
    for c in base:
        if c.model.model not in models:
            continue
        key = (c.model.model, c.data, c.backend, c.method.display(), c.bits.a, c.first_last, c.residual, c.skip,
               c.seed)
        if key in seen:  # the grid replaces the weight bits and the width: one grid per remaining axis
            continue
        seen.add(key)
        spec = resolve(c)
        if best is None:
            for d, o in itertools.product(dp.bits, dp.bits):
                out.append(_dual_cell(c, spec, dp, d, o, DUAL))
        elif (pair := best.get((c.model.model, c.method.display()))) is not None:
            for w in dp.widths:
                out.append(_dual_cell(c, spec, dp, *pair, DUAL_FRONT, width=w))
    return out
