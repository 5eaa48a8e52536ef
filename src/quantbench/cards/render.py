"""Cards as text: the five rows of seed 004 Table 1 (what the card says), then the details."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) if v else "none"
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return str(v)


def _bits(v: Any) -> str:
    return f"{v}-bit" if isinstance(v, int) else str(v)


def _kib(v: Any) -> str:
    return f"{v / 1024:.1f} KiB" if isinstance(v, (int, float)) else str(v)


def _tensor_line(name: str, t: dict[str, Any]) -> str:
    if not t.get("quantized"):
        return f"{name}: not quantized"
    return (f"{name}: {t['symmetry']} {t['granularity']}, {t['signedness']}, {t['scale']} scale, "
            f"{'/'.join(map(str, t['bits']))}-bit, calibration {t['calibration']}")


def _search_line(s: dict[str, Any]) -> str:
    """One sentence of a mixed-precision search's design choices (seed 004 Obs. 4-7)."""
    targets = ", ".join(f"{k} {v}" for k, v in (("weights avg", s.get("w_avg")), ("activations avg", s.get("a_avg")),
                                                 ("max feature map bytes", s.get("a_max_fmap_bytes"))) if v is not None)
    return (f"search: {s['kind']} constraint ({targets}), {s['allowed_kind']} bit-widths, first/last layer "
            f"{s['first_last']} the budget, {s['labels']} labels, {s['images']} images, {s['steps']} steps")


def summary_rows(card: dict[str, Any]) -> list[tuple[str, str]]:
    """The card's five categories (seed 004 Table 1), each one line of design trade-offs."""
    qm, ops = card["quantization_method"], card["quantized_operations"]
    mp, rc, pm = card["mixed_precision"], card["resource_complexity"], card["pretrained_model"]
    fl, ll = ops["first_layer"], ops["last_layer"]
    method = "; ".join([qm["uniformity"].capitalize(), _tensor_line("weights", qm["weights"]),
                        _tensor_line("activations", qm["activations"]), f"{qm['parameters']} quantizer parameters"])
    operations = "; ".join([
        f"skip connections: {ops['skip_connection']['policy']}",
        f"residual connections: {ops['residual_connection']['policy']}",
        f"first layer {fl['layer']}: weights {_bits(fl['weight_bits'])}, input {_bits(fl['input_bits'])}",
        f"last layer {ll['layer']}: weights {_bits(ll['weight_bits'])}, input {_bits(ll['input_bits'])}",
        f"pooling: {ops['pooling']['detail']}", f"concat: {ops['concat']['policy']}",
        f"BN {'folded' if ops['bn_folded'] else 'kept'}",
    ])
    mixed = "; ".join([
        "mixed precision" if mp["mixed"] else "fixed bit-widths (no mixed-precision search)",
        f"allowed bit-widths: weights {_fmt(mp['allowed_bitwidths']['weights'])}, activations "
        f"{_fmt(mp['allowed_bitwidths']['activations'])}",
        *([f"used: weights {_fmt(mp['bits_used']['weights'])}, activations {_fmt(mp['bits_used']['activations'])}"]
          if mp.get("bits_used") and mp["bits_used"] != mp["allowed_bitwidths"] else []),
        *([_search_line(mp["search"])] if mp.get("search") else []),
        f"average bits: weights {_fmt(mp['average_weight_bits'])}, activations {_fmt(mp['average_activation_bits'])}",
        f"feature maps: max {_kib(mp['max_feature_map_bytes'])}, average {_kib(mp['average_feature_map_bytes'])}",
        f"model size {_kib(mp['model_size_bytes'])} ({_fmt(mp['compression_ratio'])}x smaller than FP32)",
        *([f"per-layer bits: {_per_layer_summary(mp['per_layer'])}"] if mp.get("per_layer") else []),
    ])
    frac = rc.get("fraction_of_epoch")
    resources = "; ".join([
        f"{rc.get('calibration_examples', 'n/a')} examples", str(rc.get("calibration_data", "n/a")),
        f"training examples: {rc.get('training_examples', 'n/a')}",
        f"{_fmt(rc.get('quantization_seconds'))} s on {rc.get('device', '?')} "
        f"({_fmt(frac)} of one training epoch)" if isinstance(frac, (int, float)) else
        f"{_fmt(rc.get('quantization_seconds'))} s",
        *([_coquant_line(rc["coquant"])] if rc.get("coquant") else []),
    ])
    pretrained = (f"baseline {pm['baseline_top1']:.2f} %, quantized {pm['quantized_top1']:.2f} %, relative "
                  f"degradation {_fmt(pm['relative_degradation_percent'])} % ({pm['dataset']}, {pm['n_test']} "
                  f"test images; agreement {100 * pm['agreement']:.1f} %)")
    rows = [("Quantization Method", method), ("Quantized Operations", operations), ("Mixed Precision", mixed),
            ("Resource Complexity", resources), ("Pretrained Model", pretrained)]
    faithful = card["run"].get("faithful_to")  # cards written before the field existed have none
    return [*rows, ("Faithful To", faithful)] if faithful else rows


def _coquant_line(c: dict[str, Any]) -> str:
    """One network trained over B, evaluated at one bit-width (seed 002)."""
    how = ("zero-shot, BN calibrated on " f"{c['bn_calibration_images']} {c['bn_calibration_data']}"
           if c["zero_shot"] else "a trained bit-width")
    return (f"CoQuant: trained over B = {{{', '.join(map(str, c['trained_bits']))}}} for {c['epochs']} epochs "
            f"(teacher {c['teacher']}), evaluated at {c['evaluated_bits']} bits ({how}); interpretations in the "
            "card's resource complexity")


def _layer_text(r: dict[str, Any]) -> str:
    text = f"weights {_bits(r['weight_bits'])}, input {_bits(r['input_bits'])}"
    return text + (f" (overrides: {', '.join(r['overrides'])})" if r["overrides"] else "")


def _per_layer_summary(rows: list[dict[str, Any]]) -> str:
    """Layers grouped by (weight bits, input bits), e.g. ``16 layers w8/a8, 5 layers w4/a8 (layer3.0.conv1, ...)``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        groups.setdefault((_bits(r["weight_bits"]), _bits(r["input_bits"])), []).append(r["layer"])
    parts = []
    for (w, a), names in groups.items():
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        parts.append(f"{len(names)} layer{'s' if len(names) > 1 else ''} weights {w}/input {a} ({shown})")
    return "; ".join(parts)


def _details(section: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for k, v in section.items():
        if k == "per_layer" and isinstance(v, list):
            rows += [(f"{prefix}{k}.{r['layer']}", _layer_text(r)) for r in v]
        elif isinstance(v, dict) and not prefix:
            rows += _details(v, f"{k}.")
        else:
            rows.append((f"{prefix}{k}", _fmt(v)))
    return rows


SECTIONS = ("quantization_method", "quantized_operations", "mixed_precision", "resource_complexity",
            "pretrained_model", "not_applicable")


def details(card: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(section, [(key, value)]) for every section of the card."""
    return [(s, _details(card.get(s, {}))) for s in SECTIONS]


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown: a Table 1-style summary, then every detail."""
    r = card["run"]
    lines = [f"# Quantization card: {r['model']} on {r['backend']}, {r['method_label']}, W{r['w_bits']}A{r['a_bits']}",
             "", f"run `{r['run_id']}` · sweep `{r['sweep']}` · seed {r['seed']} · quantbench {r['code_version']}",
             "", "| Category | Design trade-offs |", "| --- | --- |"]
    lines += [f"| {c} | {_md(t)} |" for c, t in summary_rows(card)]
    for section, rows in details(card):
        lines += ["", f"## {section.replace('_', ' ').capitalize()}", "", "| item | value |", "| --- | --- |"]
        lines += [f"| {_md(k)} | {_md(v)} |" for k, v in rows]
    return "\n".join(lines) + "\n"
