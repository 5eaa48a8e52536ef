"""The ``ptq`` method kind: calibrate with a pair of observers (seed 001 C.1), no training."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationError, model_validator

from quantbench.cards.build import CardInputs, build_card
from quantbench.cards.facts import NA, collect_structure
from quantbench.cards.ptq import add_method_facts, bn_calibration_data, calibration_data
from quantbench.config import PTQConfig, QuantRunConfig, default_of, field_from
from quantbench.errors import SweepError
from quantbench.observers import OBSERVERS
from quantbench.ptq.pipeline import PTQContext, build_context, context_key, run_ptq
from quantbench.sweep.epoch import estimate_epoch_seconds
from quantbench.sweep.job import Job
from quantbench.sweep.methods.base import SWEEP_KEYS, ContextCache, Method, MethodOutcome, MethodParams, register_method
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
    w_observer_options: dict[str, Any] = field_from(PTQConfig, "w_observer_options")
    a_observer_options: dict[str, Any] = field_from(PTQConfig, "a_observer_options")
    calib_size: int = field_from(PTQConfig, "calib_size")
    calib_batch_size: int = field_from(PTQConfig, "calib_batch_size")
    bn_calib: bool = field_from(PTQConfig, "bn_calib")
    bn_calib_size: int | None = field_from(PTQConfig, "bn_calib_size")
    bn_calib_augment: bool = field_from(PTQConfig, "bn_calib_augment")
    calib_data: str = field_from(PTQConfig, "calib_data")
    synthetic_options: dict[str, Any] = field_from(PTQConfig, "synthetic_options")

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
        return (self.w_observer or default_of(PTQConfig, "w_observer"),  # the defaults of `quantbench ptq`
                self.a_observer or default_of(PTQConfig, "a_observer"))

    def default_label(self) -> str:
        w, a = self.observers
        label = w if w == a else f"{w}/{a}"
        data = "" if self.calib_data == "real" else f"@{self.calib_data}"
        return label + ("+bn" if self.bn_calib else "") + data


def cached_context(cache: ContextCache, cfg: QuantRunConfig) -> tuple[PTQContext, tuple[Any, ...]]:
    """The run's loaded model and data, shared by runs in this process with the same key (also returned)."""
    key = context_key(cfg) + ((cfg.seed,) if cfg.weights is None else ())  # random init depends on the seed

    def build() -> PTQContext:
        torch.manual_seed(cfg.seed)
        return build_context(cfg, progress=False)

    return cache.get(("ptq", key), build), key


@register_method
class PTQMethod(Method):
    """Post-training quantization: prepare for the backend, calibrate on real unlabeled images, evaluate."""

    name = "ptq"
    params_type = PTQParams
    description = "post-training quantization with a weight and an activation calibrator"
    #: Keys of a job's config that this method consumes itself; every other key must be a PTQConfig field.
    own_keys: ClassVar[frozenset[str]] = frozenset()

    def ptq_config(self, config: dict[str, Any]) -> PTQConfig:
        """The run's :class:`PTQConfig`; a key it does not know (and this method does not consume) is an
        error that names it, never dropped."""
        data = {k: v for k, v in config.items() if k not in self.own_keys and k not in SWEEP_KEYS}
        unknown = sorted(set(data) - set(PTQConfig.model_fields))
        if unknown:
            raise SweepError(f"method {self.name!r} gives keys that PTQConfig does not have: "
                             f"{', '.join(map(repr, unknown))} (declare them in {type(self).__name__}.own_keys "
                             "if the method consumes them)")
        try:
            return PTQConfig.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise SweepError(f"method {self.name!r}: {where}: {first['msg']}") from None

    def check(self, config: dict[str, Any]) -> str | None:
        self.ptq_config(config)  # raises SweepError naming the problem (refused at expansion)
        return None

    def config_fields(self, params: MethodParams) -> dict[str, Any]:
        assert isinstance(params, PTQParams)
        w, a = params.observers
        out = params.model_dump(exclude={"kind", "label", "calibrator"})
        out.update(w_observer=w, a_observer=a)
        return out

    def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
        cfg = self.ptq_config(job.config)
        spec = cfg.resolved_backend()
        ctx, key = cached_context(cache, cfg)
        result = run_ptq(cfg, progress=False, context=ctx, keep_quantizers=True)
        epoch_s = cache.get(("epoch", key), lambda: estimate_epoch_seconds(ctx.model, ctx.bundle.train, cfg.device))
        assert result.graph is not None
        structure = collect_structure(result.graph, ctx.example)  # the calibrated graph: prepared once
        quantizers = result.extra.get("quantizers", [])
        n_bn = (cfg.bn_calib_size or cfg.calib_size) if cfg.bn_calib else 0
        metrics = {k: v for k, v in result.to_dict().items() if k != "extra"}
        q_seconds = result.calib_seconds + (result.recon_seconds or 0.0)  # calibration + reconstruction
        data_text, _ = calibration_data(result.to_dict())
        metrics.update(
            epoch_seconds_estimate=epoch_s, fraction_of_epoch=q_seconds / epoch_s if epoch_s else None,
            model_size_bytes=structure.size_bytes, fp32_size_bytes=structure.fp32_size_bytes,
            train_seconds=None, latency_ms=None,
        )
        resources = {
            "method": self.name,
            "calibration_examples": cfg.calib_size,
            "calibration_data": data_text,
            "bn_calibration_examples": n_bn if n_bn else NA,
            "bn_calibration_data": bn_calibration_data(cfg.model_dump()),
            "training_examples": NA,
            "labels_used": False,
            "quantization_seconds": round(q_seconds, 4),
            "epoch_seconds_estimate": round(epoch_s, 4),
            "fraction_of_epoch": round(q_seconds / epoch_s, 6) if epoch_s else NA,
            "epoch_estimate_method": "forward+backward of one 64-image training batch x batches per epoch",
            "device": cfg.device,
        }
        rounding = add_method_facts({"extra": result.extra}, resources)
        card = build_card(CardInputs(
            run={"run_id": job.run_id, "sweep": job.sweep, "method": self.name, "method_label": job.method_label,
                 "model": cfg.model, "backend": spec.name, "backend_description": spec.description.strip(),
                 "w_bits": spec.weight.bits, "a_bits": spec.activation.bits, "seed": cfg.seed,
                 "code_version": job.identity.get("code_version", "")},
            spec=spec, structure=structure,
            observers={"weights": cfg.w_observer, "activations": cfg.a_observer},
            parameters="static", mixed_precision=False, resources=resources, rounding=rounding,
            accuracy={"model": cfg.model, "weights": cfg.weights or "random init", "dataset": cfg.data,
                      "n_test": result.n_test, "baseline_top1": result.fp_top1, "quantized_top1": result.quant_top1,
                      "agreement": result.agreement},
            signed={q["name"]: q["qmin"] < 0 for q in quantizers},
            not_applicable=NOT_APPLICABLE,
        ))
        return MethodOutcome(metrics=metrics, card=card)
