"""The card of one ``quantbench ptq`` run (the sweep builds its own with an epoch-time estimate)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch.fx as fx
from torch import Tensor

from quantbench.backends.spec import BackendSpec
from quantbench.cards.build import NEAREST, CardInputs, build_card
from quantbench.cards.facts import NA, collect_structure

NOT_APPLICABLE = {
    "training": "n/a: post-training quantization, no training or fine-tuning",
    "export": "n/a: no deployment export in this run (simulated quantization)",
    "latency": "n/a: no latency measured in this run",
    "epoch_estimate": "n/a: `quantbench ptq` does not time a training epoch (sweeps do)",
}


REAL_UNLABELED = "real, unlabeled (images from the training split; labels are not used)"


def calibration_data(result: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The card's ``calibration_data`` sentence and, for noise / synthetic sets, their facts."""
    src = result.get("extra", {}).get("data_source")
    if src is None:
        return REAL_UNLABELED, None
    real = src.get("real_images_used", 0)
    kind = "data-free" if src.get("data_free", True) else f"NOT data-free: {real} real images read"
    return (f"{src['type']}, {src['images']} images made from the float model, no labels ({kind}); "
            f"generation {src['generation_seconds']} s{' (cached)' if src.get('cached') else ''}"), src


def bn_calibration_data(config: dict[str, Any]) -> str:
    """What BN re-calibration ran on (seed 004 Table 1: kind of data), from a PTQ run's config."""
    if not config.get("bn_calib"):
        return NA
    if str(config.get("calib_data", "real")) != "real":
        return "the generated calibration set (noise / synthetic), as generated"
    if config.get("bn_calib_augment", True):
        return "real training images under the training augmentation (random crop / flip), no labels"
    return REAL_UNLABELED


def add_method_facts(result: dict[str, Any], resources: dict[str, Any]) -> str:
    """Put a run's reconstruction and generated-data facts into its card resources; return the rounding policy."""
    extra = result.get("extra", {})
    if extra.get("data_source") is not None:
        resources["data_generation"] = extra["data_source"]
    recon = extra.get("reconstruction")
    if recon is None:
        return NEAREST
    resources["reconstruction"] = reconstruction_facts(recon)
    return reconstruction_rounding(recon["method"])


def reconstruction_rounding(method: str) -> str:
    """The card's rounding policy of a reconstruction method."""
    return (f"learned ({method}: AdaRound's rounding, floor(W/s) + {{0, 1}} per weight, scales from the "
            "calibrator)")


def reconstruction_facts(recon: dict[str, Any]) -> dict[str, Any]:
    """What a card records of a reconstruction (seed 004 Table 1: amount and type of data, labels, time)."""
    return {"method": recon["method"], "images": recon["n_images"],
            "data": "as calibration_data", "labels_used": False,
            "preset": recon["preset"], "iterations_per_unit": recon["iters"], "units": len(recon["units"]),
            "seconds": round(recon["seconds"], 2), "passes_over_images": round(recon["passes"], 3),
            "options": recon["options"]}


def ptq_run_card(config: dict[str, Any], spec: BackendSpec, result: dict[str, Any], gm: fx.GraphModule,
                 example: Tensor, code_version: str, search: dict[str, Any] | None = None) -> dict[str, Any]:
    """A quantization card for a PTQ run: ``config`` is the run's config dump, ``result`` its result dict;
    the run id is a hash of the config. ``search``: the facts of the mixed-precision search that chose the
    run's per-layer bits (:func:`quantbench.mixed.card.search_facts`)."""
    run_id = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    quantizers = result.get("extra", {}).get("quantizers", [])
    label = result["w_observer"] if result["w_observer"] == result["a_observer"] else \
        f"{result['w_observer']}/{result['a_observer']}"
    data_text, _ = calibration_data(result)
    resources = {"method": "ptq", "calibration_examples": result["n_calib"], "calibration_data": data_text,
                 "bn_calibration_data": bn_calibration_data(config),
                 "training_examples": NA, "labels_used": False,
                 "quantization_seconds": round(result["calib_seconds"] + (result.get("recon_seconds") or 0.0), 4),
                 "epoch_seconds_estimate": NA, "fraction_of_epoch": NA, "device": result["device"]}
    rounding = add_method_facts(result, resources)
    method = "ptq"
    if search is not None:
        method = "mixed"
        resources.update({"method": "mixed", "training_examples": search["images"],
                          "labels_used": search["labels"] == "true",
                          "quantization_seconds": round(search["seconds"], 2),
                          "fraction_of_epoch": search["fraction_of_epoch"],
                          "epoch_estimate_method": "images processed by the search / training-set size"})
    return build_card(CardInputs(
        run={"run_id": run_id, "sweep": "", "method": method, "method_label": label, "model": result["model"],
             "backend": spec.name, "backend_description": spec.description.strip(), "w_bits": spec.weight.bits,
             "a_bits": spec.activation.bits, "seed": int(config.get("seed", 0)), "code_version": code_version},
        spec=spec, structure=collect_structure(gm, example),
        observers={"weights": result["w_observer"], "activations": result["a_observer"]},
        parameters="static", mixed_precision=search is not None,
        allowed_bitwidths=search["allowed_bitwidths"] if search else None, search=search,
        resources=resources, rounding=rounding,
        accuracy={"model": result["model"], "weights": result["weights"] or "random init", "dataset": result["data"],
                  "n_test": result["n_test"], "baseline_top1": result["fp_top1"],
                  "quantized_top1": result["quant_top1"], "agreement": result["agreement"]},
        signed={q["name"]: q["qmin"] < 0 for q in quantizers},
        not_applicable=NOT_APPLICABLE,
    ))
