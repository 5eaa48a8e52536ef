"""The ``coquant`` method kind: one CoQuant training (seed 002) shared by one sweep row per evaluated bit-width.

``{kind: coquant, trained_bits: [8, 4, 2], epochs: 3}`` with ``bits: [W8A8, W6A6, W4A4, W2A2]`` trains one network
over B = {8, 4, 2} once and stores four runs: each evaluates the network at its ``W{b}A{b}``, a bit-width outside B
zero-shot after BN calibration. The runs share the training by identity: their folder
(``OUT/checkpoints/coquant-<hash>``) is named by everything but the evaluated bit-width, so the first run trains and
the others (in this sweep or a later one) read its ``final.pt``; parallel workers wait on a lock beside the folder
instead of training twice. Keys other than the ones below are :class:`~quantbench.coquant.config.CoQuantConfig`'s
defaults (the academic setting, PACT activations with DoReFa weights).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from quantbench.config import field_from
from quantbench.coquant.config import CoQuantConfig, bit_set
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

#: job-config keys that pick the evaluated bit-width, not the training
EVALUATION_KEYS = frozenset({"w_bits", "a_bits"})


class CoQuantParams(MethodParams):
    """The training of one CoQuant network; the sweep's ``bits`` pick the bit-widths it is evaluated at."""

    kind: Literal["coquant"] = "coquant"
    trained_bits: list[int] = Field(default_factory=lambda: [8, 4, 2], min_length=1,
                                    description="the trained set B (seed 002)")
    epochs: int = Field(3, ge=1, le=100_000)
    teacher: Literal["dynamic", "recursive", "none"] = field_from(CoQuantConfig, "teacher")
    p1: float = field_from(CoQuantConfig, "p1")
    lam: float = field_from(CoQuantConfig, "lam")
    distance: Literal["weights", "kl"] = field_from(CoQuantConfig, "distance")
    ramp_epochs: float = field_from(CoQuantConfig, "ramp_epochs")
    bn_calib_size: int = field_from(CoQuantConfig, "bn_calib_size")
    bn_calib_augment: bool = field_from(CoQuantConfig, "bn_calib_augment")
    zero_shot_ranges: Literal["linear", "nearest"] = field_from(CoQuantConfig, "zero_shot_ranges")
    algorithm_options: dict[str, Any] = Field(default_factory=dict, description="PACT's options, e.g. "
                                              "centred_weights: true (AdaBits' modified weight quantizer)")
    lr: float | None = Field(None, gt=0, le=10, description="default: the model family's QAT rate")
    batch_size: int = Field(128, ge=1)
    max_train: int | None = Field(None, ge=1)
    calib_size: int = field_from(CoQuantConfig, "calib_size")

    @field_validator("trained_bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        return bit_set(v)

    def default_label(self) -> str:
        return f"coquant{{{','.join(map(str, self.trained_bits))}}}:{self.epochs}ep"


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One process trains a shared run at a time (the others then find its ``final.pt``)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_name(run_dir.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@register_method
class CoQuantMethod(Method):
    """Seed 002's CoQuant: one network over a bit-width set, a store row per evaluated bit-width."""

    name = "coquant"
    params_type = CoQuantParams
    description = "CoQuant (seed 002): one network trained over a bit-width set B, a row per evaluated bit-width"
    needs_run_dir = True

    def coquant_config(self, config: dict[str, Any], out_dir: str | None = None) -> CoQuantConfig:
        data = {k: v for k, v in config.items() if k not in SWEEP_KEYS | EVALUATION_KEYS}
        data["bits"] = data.pop("trained_bits")
        return training_config(self.name, CoQuantConfig, data, out_dir)

    def check(self, config: dict[str, Any]) -> str | None:
        w, a = config.get("w_bits"), config.get("a_bits")
        if w != a or w is None:
            return (f"CoQuant evaluates weights and activations at one bit-width: give W{w}A{w} or W{a}A{a} "
                    f"instead of W{w}A{a}")
        if not 2 <= w <= 8:
            return f"a CoQuant network runs at 2..8 bits, not {w}"
        self.coquant_config(config)
        return None

    def run_dir_name(self, job: Job) -> str:
        """Named by the training's identity (every key but the evaluated bit-width): the rows of one training
        share its folder."""
        cfg = self.coquant_config(job.config)
        shared = {k: v for k, v in job.identity.items() if k not in EVALUATION_KEYS | {"backend_spec"}}
        shared["training_backend"] = cfg.resolved_backend().model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return f"coquant-{digest}"

    def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
        with run_folder(job) as (run_dir, kept):
            return self._run_in(job, run_dir, kept)

    def _run_in(self, job: Job, run_dir: Path, kept: bool) -> MethodOutcome:
        from quantbench.coquant.card import coquant_card
        from quantbench.coquant.evaluate import evaluate_run
        from quantbench.coquant.pipeline import run_coquant

        cfg = self.coquant_config(job.config, str(run_dir))
        with _locked(run_dir):
            cached = train_once(run_dir, cfg, run_coquant)
        trained = json.loads((run_dir / "result.json").read_text())
        ev = evaluate_run(run_dir, int(job.config["w_bits"]), cfg.device)
        card = coquant_card(
            ev, {"run_id": job.run_id, "sweep": job.sweep, "method_label": job.method_label,
                 "code_version": job.identity.get("code_version", "")},
            int(trained["train_images"]), float(trained["train_seconds"]),
            str(run_dir / FINAL) if kept else "not kept (no run folder)", cached)
        size = prepared_size(ev.graph)
        structure = card["mixed_precision"]
        metrics = {"fp_top1": ev.fp_top1, "quant_top1": ev.result.quant_top1, "agreement": ev.result.agreement,
                   "n_test": ev.n_test, "epochs": cfg.epochs, "train_seconds": float(trained["train_seconds"]),
                   "zero_shot": ev.result.zero_shot, "bn_calib_images": ev.result.bn_calib_images,
                   "trained_bits": ev.trained_bits, "c_size_bits": size.c_size_bits,
                   "model_size_bytes": structure["model_size_bytes"],
                   "fp32_size_bytes": structure["fp32_model_size_bytes"], "width_mult": cfg.width_mult,
                   "checkpoint_reused": cached, "latency_ms": None}
        return MethodOutcome(metrics=metrics, card=card)
