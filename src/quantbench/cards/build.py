"""Build a quantization card (seed 004 section 3, Tables 1, 3 and 4) from what a run actually did."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from quantbench.backends.spec import BackendSpec
from quantbench.cards.facts import NA, Structure, average_activation_bits, average_weight_bits
from quantbench.observers import OBSERVERS

CARD_VERSION = 1


NEAREST = "nearest (round half to even)"  # the weights' rounding without reconstruction


@dataclass
class CardInputs:
    """Everything a card is made of. ``signed`` maps quantizer names to the signedness calibration chose."""

    run: dict[str, Any]
    spec: BackendSpec
    structure: Structure
    observers: dict[str, str]  # role ("weights" / "activations") -> observer name
    parameters: str  # "static" or "dynamic"
    mixed_precision: bool
    resources: dict[str, Any]
    accuracy: dict[str, Any]
    signed: dict[str, bool] = field(default_factory=dict)
    not_applicable: dict[str, str] = field(default_factory=dict)
    #: the weights' rounding policy (seed 004 2.1: methods that do not round to nearest must say so)
    rounding: str = NEAREST
    #: the bit-widths the run was *allowed* (a mixed-precision search's set, per tensor class); a class missing here
    #: (a fixed-precision run) is allowed the bits its configuration sets, i.e. those it uses
    allowed_bitwidths: dict[str, list[int]] | None = None
    #: a mixed-precision search's facts (constraint kind and targets, first/last in the budget, labels, ...)
    search: dict[str, Any] | None = None


def _observer_doc(name: str) -> str:
    """One line saying what the calibrator does: its class docstring, else its module's."""
    cls = OBSERVERS.get(name)
    for doc in (cls.__doc__, getattr(inspect.getmodule(cls), "__doc__", None)):
        first = (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
        if first and not first.startswith("Options"):
            return first
    return name


def _one_or_mixed(values: set[str], mixed: str = "mixed") -> str:
    if not values:
        return NA
    return next(iter(values)) if len(values) == 1 else f"{mixed} ({', '.join(sorted(values))})"


def _tensor_class(rows: list[dict[str, Any]], signed: dict[str, bool], observer: str | None) -> dict[str, Any]:
    """Summary of the schemes one class of tensors (weights or activations) was quantized with."""
    if not rows:
        return {"quantized": False, "symmetry": NA, "granularity": NA, "signedness": NA, "scale": NA,
                "narrow_range": NA, "bits": [], "calibration": NA, "calibration_description": NA, "count": 0}
    resolved = [signed.get(r["name"], r["signedness"] == "signed") for r in rows]
    n_signed = sum(resolved)
    if n_signed == len(rows):
        signedness = "signed"
    elif n_signed == 0:
        signedness = "unsigned"
    else:
        signedness = f"signed for {n_signed}, unsigned for {len(rows) - n_signed} (non-negative tensors)"
    if any(r["signedness"] == "adaptive" for r in rows):
        signedness = f"adaptive: {signedness}"
    return {
        "quantized": True,
        "symmetry": _one_or_mixed({"symmetric" if r["symmetric"] else "asymmetric" for r in rows}),
        "granularity": _one_or_mixed({r["granularity"].replace("_", "-") for r in rows}),
        "signedness": signedness,
        "scale": _one_or_mixed({"power-of-two" if r["scale_type"] == "pow2" else "float" for r in rows}),
        "narrow_range": any(r["narrow_range"] for r in rows),
        "bits": sorted({int(r["bits"]) for r in rows}),
        "calibration": observer or NA,
        "calibration_description": _observer_doc(observer) if observer else NA,
        "count": len(rows),
    }


def _method_section(inp: CardInputs) -> dict[str, Any]:
    st = inp.structure
    w = _tensor_class(st.weight_schemes, inp.signed, inp.observers.get("weights"))
    a = _tensor_class(st.activation_schemes, inp.signed, inp.observers.get("activations"))
    summary = (f"uniform; weights {w['symmetry']} {w['granularity']} ({w['calibration']}); activations "
               f"{a['symmetry']} {a['granularity']} ({a['calibration']}); {inp.parameters} quantizer parameters")
    return {"uniformity": "uniform", "weights": w, "activations": a, "parameters": inp.parameters,
            "rounding": inp.rounding, "summary": f"{summary}; weight rounding {inp.rounding}"}


def _operations_section(inp: CardInputs) -> dict[str, Any]:
    ops = dict(inp.structure.operations)
    p = inp.spec.placement
    ops["placement"] = ("every op output re-quantized" if p.mode == "outputs"
                        else "inputs of conv/linear layers only; other ops in float")
    ops["bn_folded"] = inp.spec.fold_bn
    return ops


def _mixed_section(inp: CardInputs) -> dict[str, Any]:
    st = inp.structure
    maps = st.feature_maps
    w_bits = sorted({b for b in st.weight_bits.values() if b is not None})
    a_bits = sorted({f.bits for f in maps})
    fp_layers = sorted(k for k, b in st.weight_bits.items() if b is None)
    out = {
        "mixed": inp.mixed_precision,
        "allowed_bitwidths": {k: (inp.allowed_bitwidths or {}).get(k) or used
                              for k, used in (("weights", w_bits), ("activations", a_bits))},
        "bits_used": {"weights": w_bits, "activations": a_bits},
        "float_layers": fp_layers,
        "average_weight_bits": round(average_weight_bits(st), 4),
        "average_activation_bits": (round(v, 4) if isinstance(v := average_activation_bits(st), float) else v),
        "max_feature_map_bytes": max((f.bytes for f in maps), default=NA),
        "average_feature_map_bytes": round(sum(f.bytes for f in maps) / len(maps), 2) if maps else NA,
        "quantized_feature_maps": len(maps),
        "model_size_bytes": st.size_bytes,
        "fp32_model_size_bytes": st.fp32_size_bytes,
        "compression_ratio": round(st.fp32_size_bytes / st.size_bytes, 4) if st.size_bytes else NA,
        "per_layer": st.layers,
    }
    if inp.search is not None:
        out["search"] = inp.search
    return out


def _pretrained_section(acc: dict[str, Any]) -> dict[str, Any]:
    fp, q = float(acc["baseline_top1"]), float(acc["quantized_top1"])
    return {**acc, "absolute_drop": round(fp - q, 4),
            "relative_degradation_percent": round(100.0 * (fp - q) / fp, 4) if fp else NA}


def faithful_to(spec: Any) -> str:
    """Which real runtime a simulated number stands for, and how closely (from the backend spec)."""
    if not spec.faithful_to:
        return ("no real runtime: fake quantization" + (f" ({spec.not_deployable_because.strip()})"
                                                         if not spec.deployable else ""))
    return "; ".join(f"{rt}: {how}" for rt, how in spec.faithful_to.items())


def build_card(inp: CardInputs) -> dict[str, Any]:
    """The card as a JSON-able dict (validated by ``card.schema.json``)."""
    return {
        "card_version": CARD_VERSION,
        "run": {**inp.run, "faithful_to": faithful_to(inp.spec)},
        "quantization_method": _method_section(inp),
        "quantized_operations": _operations_section(inp),
        "mixed_precision": _mixed_section(inp),
        "resource_complexity": inp.resources,
        "pretrained_model": _pretrained_section(inp.accuracy),
        "not_applicable": inp.not_applicable,
    }
