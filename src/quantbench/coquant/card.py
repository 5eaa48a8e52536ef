"""The quantization card of a CoQuant network at one bit-width: the trained set B, the evaluated bit-width, whether
it is zero-shot and on how many images its BN was calibrated, the training budget, and the interpretations in force
(seed 002's supplement leaves them open)."""

from __future__ import annotations

from typing import Any

import torch

from quantbench.cards import validate_card
from quantbench.cards.build import CardInputs, build_card
from quantbench.cards.facts import NA, collect_structure
from quantbench.coquant.evaluate import RunEvaluation
from quantbench.models import get_entry


def coquant_facts(ev: RunEvaluation, checkpoint: str, reused: bool | None = None) -> dict[str, Any]:
    """The card's ``coquant`` block (under resource complexity)."""
    cfg, r = ev.config, ev.result
    return {"trained_bits": ev.trained_bits, "evaluated_bits": r.bits, "zero_shot": r.zero_shot,
            "bn_calibration_images": r.bn_calib_images,
            "bn_calibration_data": ("training images under the training augmentation" if cfg.bn_calib_augment
                                    else "un-augmented training images") if r.bn_calib_images else NA,
            "epochs": cfg.epochs, "teacher": cfg.teacher, "p1": cfg.p1, "lambda": cfg.lam, "distance": cfg.distance,
            "ramp_epochs": cfg.ramp_epochs, "algorithm": cfg.algorithm, "lr": cfg.resolved()["lr"],
            "batch_size": cfg.batch_size,
            "checkpoint": checkpoint, **({} if reused is None else {"checkpoint_reused": reused}),
            "interpretations": cfg.interpretations()}


def coquant_card(ev: RunEvaluation, run: dict[str, Any], training_images: int | None, train_seconds: float,
                 checkpoint: str, reused: bool | None = None) -> dict[str, Any]:
    """A validated card; ``run`` holds the run block's identifiers (run id, sweep, method, code version)."""
    cfg = ev.config
    spec = cfg.backend_at(ev.result.bits)
    entry = get_entry(cfg.model)
    structure = collect_structure(ev.graph, torch.zeros(1, *entry.input_size))
    w_obs, a_obs = cfg.observers()
    resources = {
        "method": "coquant", "calibration_examples": cfg.calib_size,
        "calibration_data": "real (the PTQ calibration that initialises training, seed 001 C.4)",
        "bn_calibration_examples": ev.result.bn_calib_images or NA,
        "training_examples": training_images or NA, "labels_used": True,
        "quantization_seconds": round(train_seconds + ev.seconds, 2),
        "epoch_seconds_estimate": round(train_seconds / cfg.epochs, 3) if train_seconds > 0 else NA,
        "fraction_of_epoch": float(cfg.epochs), "epoch_estimate_method": "measured: training seconds / epochs",
        "device": "cuda" if str(cfg.device).startswith("cuda") else "cpu",
        "coquant": coquant_facts(ev, checkpoint, reused),
    }
    card = build_card(CardInputs(
        run={**run, "method": "coquant", "model": cfg.model, "backend": spec.name,
             "backend_description": spec.description.strip(), "w_bits": spec.weight.bits,
             "a_bits": spec.activation.bits, "seed": cfg.seed},
        spec=spec, structure=structure, observers={"weights": w_obs, "activations": a_obs},
        parameters="static", mixed_precision=bool(cfg.overrides), resources=resources,
        accuracy={"model": cfg.model, "weights": cfg.weights or "none: trained from scratch",
                  "dataset": cfg.data, "n_test": ev.n_test, "baseline_top1": ev.fp_top1,
                  "quantized_top1": ev.result.quant_top1, "agreement": ev.result.agreement},
        not_applicable={"export": "n/a: CoQuant keeps one BatchNorm per bit-width unfolded (the academic "
                                  "setting), which no integer runtime executes",
                        "latency": "n/a: no latency measured in this run"},
    ))
    validate_card(card)
    return card
