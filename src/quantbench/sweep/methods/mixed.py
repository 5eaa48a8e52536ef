"""The ``mixed`` method kind: a learned (or analytic) mixed-precision allocation, evaluated as a PTQ run.

``{kind: mixed, w_avg: 4, allowed: [2, 4, 8], first_last_budget: out, labels: pseudo}``; every field of
:class:`quantbench.mixed.config.MixedConfig` that is not a sweep axis (model, backend, seed, ...) is a key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError, create_model

from quantbench.cards import validate_card
from quantbench.cards.ptq import ptq_run_card
from quantbench.config import QuantRunConfig, field_from
from quantbench.errors import SweepError
from quantbench.mixed.card import search_facts
from quantbench.mixed.config import MixedConfig
from quantbench.mixed.pipeline import run_mixed
from quantbench.sweep.job import Job
from quantbench.sweep.methods.base import ContextCache, Method, MethodOutcome, MethodParams, register_method
from quantbench.sweep.methods.ptq import cached_context

#: MixedConfig's own fields, and the calibration fields whose defaults it changes
OWN = [f for f in MixedConfig.model_fields if f not in QuantRunConfig.model_fields] + [
    "w_observer", "a_observer", "calib_size"]

_Fields = create_model(  # type: ignore[call-overload]
    "_MixedFields", __base__=MethodParams, kind=(Literal["mixed"], "mixed"),
    **{f: (MixedConfig.model_fields[f].annotation, field_from(MixedConfig, f)) for f in OWN})


class MixedParams(_Fields):  # type: ignore[misc, valid-type]
    """MixedConfig's own keys; the label names the constraint (``mixed:w4a4``, ``mixed:w3{2,4,8}``...)."""

    def default_label(self) -> str:
        c = "".join(f"{k}{v:g}" for k, v in (("w", self.w_avg), ("a", self.a_avg)) if v is not None)
        c += f"fmap{self.a_max_fmap:g}B" if self.a_max_fmap is not None else ""
        allowed = "{" + ",".join(map(str, self.allowed)) + "}" if self.allowed else ""
        return f"mixed:{c}{allowed}" + ("-fl_out" if self.first_last_budget == "out" else "") + (
            "-pseudo" if self.labels == "pseudo" else "") + ("-dither" if self.estimator == "dither" else "") + (
            "-learned" if self.fmap_mode == "learned" else "")


@register_method
class MixedMethod(Method):
    """Learned post-training mixed precision (seed 004 App. A) under average / maximum constraints."""

    name = "mixed"
    params_type = MixedParams
    description = "learned mixed-precision bit allocation (seed 004), evaluated as PTQ with per-layer overrides"

    def mixed_config(self, config: dict[str, Any]) -> MixedConfig:
        data = {k: v for k, v in config.items() if k in MixedConfig.model_fields}
        try:
            return MixedConfig.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise SweepError(f"method 'mixed': {'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    def check(self, config: dict[str, Any]) -> str | None:
        self.mixed_config(config)
        return None

    def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
        cfg = self.mixed_config(job.config)
        ctx, _ = cached_context(cache, cfg)
        result = run_mixed(cfg, progress=False, context=ctx)
        ptq = result.ptq
        assert ptq.graph is not None
        search = search_facts(result, len(ctx.bundle.train))  # type: ignore[arg-type]
        card = ptq_run_card(cfg.model_dump(), cfg.resolved_backend(), ptq.to_dict(), ptq.graph, ctx.example,
                            job.identity.get("code_version", ""), search=search)
        card["run"].update(run_id=job.run_id, sweep=job.sweep, method_label=job.method_label, seed=cfg.seed)
        validate_card(card)
        d = result.to_dict()
        metrics = {k: v for k, v in ptq.to_dict().items() if k != "extra"}
        metrics.update({k: d[k] for k in ("avg_weight_bits", "avg_activation_bits", "max_fmap_bytes", "constraint",
                                          "allocation", "baselines", "notes")})
        metrics.update(model_size_bytes=card["mixed_precision"]["model_size_bytes"],
                       search_seconds=result.search.seconds if result.search else 0.0, run_seconds=result.seconds,
                       train_seconds=None, latency_ms=None)
        return MethodOutcome(metrics=metrics, card=card)
