"""The ``ptq`` method kind: calibrate with a pair of observers (seed 001 C.1), no training."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from quantbench.cards.build import CardInputs, build_card
from quantbench.cards.facts import NA, collect_structure
from quantbench.config import PTQConfig
from quantbench.graph.quantize import prepare
from quantbench.observers import OBSERVERS
from quantbench.ptq.pipeline import PTQContext, build_context, run_ptq
from quantbench.sweep.epoch import estimate_epoch_seconds
from quantbench.sweep.job import Job
from quantbench.sweep.methods.base import ContextCache, Method, MethodOutcome, MethodParams, register_method
from quantbench.sweep.schema import known

NOT_APPLICABLE = {
    "training": "n/a: post-training quantization, no training or fine-tuning",
    "export": "n/a: no deployment export in this run (simulated quantization)",
    "latency": "n/a: no latency measured in this run",
}


class PTQParams(MethodParams):
    """``{kind: ptq, calibrator: mse}`` or ``{kind: ptq, w_observer: minmax, a_observer: kld, ...}``."""

    kind: Literal["ptq"] = "ptq"
    calibrator: str | None = Field(None, description="one observer for weights and activations")
    w_observer: str | None = None
    a_observer: str | None = None
    w_observer_options: dict[str, Any] = Field(default_factory=dict)
    a_observer_options: dict[str, Any] = Field(default_factory=dict)
    calib_size: int = Field(256, ge=1)
    calib_batch_size: int = Field(64, ge=1)
    bn_calib: bool = False
    bn_calib_size: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _observers(self) -> PTQParams:
        if self.calibrator is not None and (self.w_observer or self.a_observer):
            raise ValueError("give either calibrator (both observers) or w_observer/a_observer, not both")
        for name in (self.calibrator, self.w_observer, self.a_observer):
            if name is not None:
                known(OBSERVERS.get, name)
        return self

    @property
    def observers(self) -> tuple[str, str]:
        if self.calibrator is not None:
            return self.calibrator, self.calibrator
        fields = PTQConfig.model_fields  # the defaults of `quantbench ptq`
        return self.w_observer or fields["w_observer"].default, self.a_observer or fields["a_observer"].default

    def default_label(self) -> str:
        w, a = self.observers
        label = w if w == a else f"{w}/{a}"
        return label + ("+bn" if self.bn_calib else "")


def _context_key(cfg: PTQConfig) -> tuple[Any, ...]:
    return (cfg.model, cfg.weights, cfg.data, cfg.width_mult, cfg.device, cfg.eval_batch_size, cfg.max_test)


@register_method
class PTQMethod(Method):
    """Post-training quantization: prepare for the backend, calibrate on real unlabeled images, evaluate."""

    name = "ptq"
    params_type = PTQParams
    description = "post-training quantization with a weight and an activation calibrator"

    def config_fields(self, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, PTQParams)
        w, a = params.observers
        out = params.model_dump(exclude={"kind", "label", "calibrator"})
        out.update(w_observer=w, a_observer=a)
        return out

    def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
        cfg = PTQConfig.model_validate({k: v for k, v in job.config.items() if k in PTQConfig.model_fields})
        spec = cfg.resolved_backend()
        key = _context_key(cfg) + ((cfg.seed,) if cfg.weights is None else ())  # random init depends on the seed

        def build() -> PTQContext:
            torch.manual_seed(cfg.seed)
            return build_context(cfg, progress=False)

        ctx: PTQContext = cache.get(("ptq", key), build)
        result = run_ptq(cfg, progress=False, context=ctx, keep_quantizers=True)
        epoch_s = cache.get(("epoch", key), lambda: estimate_epoch_seconds(ctx.model, ctx.bundle.train, cfg.device))
        gm = prepare(ctx.model, spec, ctx.example, cfg.w_observer, cfg.a_observer, cfg.w_observer_options,
                     cfg.a_observer_options)
        structure = collect_structure(gm, ctx.example)
        quantizers = result.extra.get("quantizers", [])
        n_bn = (cfg.bn_calib_size or cfg.calib_size) if cfg.bn_calib else 0
        metrics = {k: v for k, v in result.to_dict().items() if k != "extra"}
        metrics.update(
            epoch_seconds_estimate=epoch_s, fraction_of_epoch=result.calib_seconds / epoch_s if epoch_s else None,
            model_size_bytes=structure.size_bytes, fp32_size_bytes=structure.fp32_size_bytes,
            train_seconds=None, latency_ms=None,
        )
        resources = {
            "method": self.name,
            "calibration_examples": cfg.calib_size,
            "calibration_data": "real, unlabeled (images from the training split; labels are not used)",
            "bn_calibration_examples": n_bn if n_bn else NA,
            "training_examples": NA,
            "labels_used": False,
            "quantization_seconds": round(result.calib_seconds, 4),
            "epoch_seconds_estimate": round(epoch_s, 4),
            "fraction_of_epoch": round(result.calib_seconds / epoch_s, 6) if epoch_s else NA,
            "epoch_estimate_method": "forward+backward of one 64-image training batch x batches per epoch",
            "device": cfg.device,
        }
        card = build_card(CardInputs(
            run={"run_id": job.run_id, "sweep": job.sweep, "method": self.name, "method_label": job.method_label,
                 "model": cfg.model, "backend": spec.name, "backend_description": spec.description.strip(),
                 "w_bits": spec.weight.bits, "a_bits": spec.activation.bits, "seed": cfg.seed,
                 "code_version": job.identity.get("code_version", "")},
            spec=spec, structure=structure,
            observers={"weights": cfg.w_observer, "activations": cfg.a_observer},
            parameters="static", mixed_precision=False, resources=resources,
            accuracy={"model": cfg.model, "weights": cfg.weights or "random init", "dataset": cfg.data,
                      "n_test": result.n_test, "baseline_top1": result.fp_top1, "quantized_top1": result.quant_top1,
                      "agreement": result.agreement},
            signed={q["name"]: q["qmin"] < 0 for q in quantizers},
            not_applicable=NOT_APPLICABLE,
        ))
        return MethodOutcome(metrics=metrics, card=card)
