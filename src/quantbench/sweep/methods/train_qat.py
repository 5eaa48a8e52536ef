"""The ``train_qat`` method kind: quantization-aware training as a sweep run, from scratch or from weights.

``{kind: train_qat, epochs: 30}`` trains with seed 003's recipe (section 5 / App. D): SGD with Nesterov momentum 0.9,
lr 0.05 with a 5-epoch linear warm-up and cosine decay, batch 128, weight decay 5e-4, and seed 003's weight
quantizers (``algorithm: gaussian``: Gaussian-optimal clipping above 2 bits, ternary at 2, binary at 1). Every key
is a :class:`quantbench.qat.config.QATConfig` field and may be changed (``algorithm: lsq``, ``lr: 0.01``...). The
model entry's ``weights: null`` means training from scratch (random initialisation, seeded).

The trained checkpoint is kept under ``OUT/checkpoints/<run id>/`` (``final.pt``, with the run's config): a run
whose checkpoint is there is not trained again (its stored metrics are read back), and ``quantbench export --from``
or ``verify`` can use it. The run id covers the code version, as every run's does, so an edit of quantbench trains
anew; an interrupted training resumes from its last epoch checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from quantbench.cards import validate_card
from quantbench.cards.build import CardInputs, build_card
from quantbench.cards.facts import NA, collect_structure
from quantbench.config import field_from
from quantbench.models import get_entry
from quantbench.qat.checkpoint import load_checkpoint
from quantbench.qat.config import QATConfig
from quantbench.qat.load import load_qat_run
from quantbench.qat.pipeline import run_qat
from quantbench.qat.quantizers import ALGORITHMS
from quantbench.size import prepared_size
from quantbench.sweep.job import Job
from quantbench.sweep.methods.base import (
    FINAL,
    SWEEP_KEYS,
    ContextCache,
    Method,
    MethodOutcome,
    MethodParams,
    register_method,
    run_folder,
    train_once,
    training_config,
)
from quantbench.sweep.schema import known


class TrainQATParams(MethodParams):
    """Seed 003's training recipe as defaults; ``epochs`` is set by the sweep."""

    kind: Literal["train_qat"] = "train_qat"
    epochs: int = Field(ge=1, le=100_000, description="training epochs (seed 003: 300 on CIFAR)")
    algorithm: str = "gaussian"
    algorithm_options: dict[str, Any] = Field(default_factory=dict)
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    quantizer_lr: float | None = field_from(QATConfig, "quantizer_lr")
    warmup_epochs: float = Field(5.0, ge=0, description="linear warm-up epochs (seed 003: 5)")
    batch_size: int = Field(128, ge=1)
    max_train: int | None = field_from(QATConfig, "max_train")
    augment: bool = True
    bn_fold: int = field_from(QATConfig, "bn_fold")
    label_smoothing: float = field_from(QATConfig, "label_smoothing")
    calib_size: int = field_from(QATConfig, "calib_size")

    def default_label(self) -> str:
        return f"{self.algorithm}:{self.epochs}ep"

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, v: str) -> str:
        known(ALGORITHMS.get, v)
        return v

    @model_validator(mode="after")
    def _warmup_below_epochs(self) -> TrainQATParams:
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs {self.warmup_epochs:g} must be below epochs {self.epochs}: lower it "
                             "(seed 003 warms up 5 of 300 epochs)")
        return self


@register_method
class TrainQATMethod(Method):
    """Quantization-aware training (from scratch with ``weights: null``) with seed 003's recipe by default."""

    name = "train_qat"
    params_type = TrainQATParams
    description = "quantization-aware training (seed 003's recipe and weight quantizers by default), checkpoint cached"
    needs_run_dir = True

    def qat_config(self, config: dict[str, Any], out_dir: str | None = None) -> QATConfig:
        return training_config(self.name, QATConfig, {k: v for k, v in config.items() if k not in SWEEP_KEYS},
                               out_dir)

    def binary_weights(self, params: MethodParams) -> bool:
        assert isinstance(params, TrainQATParams)
        return ALGORITHMS.get(params.algorithm).binary_weights

    def check(self, config: dict[str, Any]) -> str | None:
        self.qat_config(config)
        return None

    def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
        with run_folder(job) as (run_dir, kept):
            return self._run_in(job, run_dir, kept)

    def _run_in(self, job: Job, run_dir: Path, kept: bool) -> MethodOutcome:
        cfg = self.qat_config(job.config, str(run_dir))
        cached = train_once(run_dir, cfg, run_qat)
        saved = load_checkpoint(run_dir / FINAL)["metrics"]
        gm, _ = load_qat_run(run_dir)
        entry = get_entry(cfg.model)
        example = torch.zeros(1, *entry.input_size)
        structure = collect_structure(gm, example)
        size = prepared_size(gm)
        spec = cfg.resolved_backend()
        w_obs, a_obs = cfg.observers()
        n_train = int(saved.get("n_train") or 0) or None
        recipe = {"algorithm": cfg.algorithm, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": cfg.weight_decay,
                  "warmup_epochs": cfg.warmup_epochs, "schedule": "cosine", "from_scratch": cfg.weights is None,
                  "checkpoint": str(run_dir / FINAL) if kept else "not kept (no run folder)",
                  "checkpoint_reused": cached}
        train_s = float(saved.get("train_seconds", 0.0))
        resources = {
            "method": self.name, "calibration_examples": cfg.calib_size,
            "calibration_data": "real (the PTQ calibration that initialises QAT, seed 001 C.4)",
            "bn_calibration_examples": NA, "training_examples": n_train if n_train else NA, "labels_used": True,
            "quantization_seconds": round(train_s + float(saved.get("calib_seconds", 0.0)), 2),
            "epoch_seconds_estimate": round(float(saved.get("seconds_per_epoch", 0.0)), 3),
            "fraction_of_epoch": float(cfg.epochs), "epoch_estimate_method": "measured: training seconds / epochs",
            "device": cfg.device, "training": recipe,
        }
        card = build_card(CardInputs(
            run={"run_id": job.run_id, "sweep": job.sweep, "method": self.name, "method_label": job.method_label,
                 "model": cfg.model, "backend": spec.name, "backend_description": spec.description.strip(),
                 "w_bits": spec.weight.bits, "a_bits": spec.activation.bits, "seed": cfg.seed,
                 "code_version": job.identity.get("code_version", "")},
            spec=spec, structure=structure, observers={"weights": w_obs, "activations": a_obs},
            parameters="static", mixed_precision=bool(cfg.overrides), resources=resources,
            accuracy={"model": cfg.model, "weights": cfg.weights or f"none: trained from scratch (width "
                      f"{cfg.width_mult:g}, seed {cfg.seed}); the FP32 baseline is the untrained network",
                      "dataset": cfg.data, "n_test": int(saved["n_test"]), "baseline_top1": float(saved["fp_top1"]),
                      "quantized_top1": float(saved["quant_top1"]), "agreement": float(saved["agreement"])},
            not_applicable={"export": "n/a: no deployment export in this run (the checkpoint can be exported)",
                            "latency": "n/a: no latency measured in this run"},
        ))
        validate_card(card)
        metrics = {k: saved[k] for k in ("fp_top1", "quant_top1", "agreement", "n_test", "init_top1", "epochs",
                                         "train_seconds", "seconds_per_epoch", "calib_seconds") if k in saved}
        metrics.update(c_size_bits=size.c_size_bits, model_size_bytes=structure.size_bytes,
                       fp32_size_bytes=structure.fp32_size_bytes, width_mult=cfg.width_mult,
                       checkpoint_reused=cached, latency_ms=None)
        return MethodOutcome(metrics=metrics, card=card)
