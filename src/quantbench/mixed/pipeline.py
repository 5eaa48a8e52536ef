"""One mixed-precision run end to end: calibrate, allocate (learned, analytic), evaluate the allocation as a PTQ
run with per-layer overrides (so ``ptq --overrides`` reproduces it), and the baselines beside it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from quantbench.config import PTQConfig
from quantbench.data import calibration_subset, make_loader
from quantbench.graph.quantize import activation_quantizers, list_layers, prepare, weight_layers
from quantbench.mixed.allocation import Allocation
from quantbench.mixed.budget import Budget, analytic_max_fmap
from quantbench.mixed.config import MixedConfig
from quantbench.mixed.greedy import sensitivity_greedy, uniform
from quantbench.mixed.search import Searchable, SearchReport, attach, learn
from quantbench.ptq.calibrate import calibrate
from quantbench.ptq.pipeline import PTQContext, PTQResult, build_context, context_key, run_ptq

EDGE_BITS = 8  # the first and last layer out of the budget (seed 004 Table 2)


@dataclass
class MixedResult:
    """The allocation, its accuracy as a PTQ run, what it achieved against the constraints, and the baselines."""

    config: dict[str, Any]
    ptq: PTQResult
    allocation: Allocation
    averages: dict[str, float | None]
    constraint: dict[str, Any]
    search: SearchReport | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_sizes: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        p = self.ptq
        return {
            "model": p.model, "backend": p.backend, "fp_top1": p.fp_top1, "quant_top1": p.quant_top1,
            "agreement": p.agreement, "n_test": p.n_test, **self.averages, "constraint": self.constraint,
            "allocation": self.allocation.to_dict(), "search": asdict(self.search) if self.search else None,
            "seconds": self.seconds, "notes": self.notes, "baselines": self.baselines,
            "layer_sizes": self.layer_sizes, "layers": p.layers, "config": self.config,
        }


def _ptq_config(cfg: MixedConfig, alloc: Allocation) -> PTQConfig:
    fields = {k: getattr(cfg, k) for k in PTQConfig.model_fields if k in MixedConfig.model_fields}
    fields["overrides"] = [*cfg.overrides, *alloc.overrides()]
    return PTQConfig(**fields)


def _elements(gm: fx.GraphModule, example: Tensor) -> dict[str, int]:
    """Elements per image of every activation quantizer's tensor."""
    sizes: dict[str, int] = {}
    hooks = [q.register_forward_hook(lambda m, i, o, name=q.name: sizes.__setitem__(name, o[0].numel()))
             for _, q in activation_quantizers(gm)]
    try:
        with torch.no_grad():
            gm(example)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _train_set(cfg: MixedConfig, ctx: PTQContext) -> tuple[Tensor, Tensor]:
    ds = calibration_subset(ctx.bundle, cfg.images, cfg.seed)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    if cfg.labels == "pseudo":
        with torch.no_grad():
            y = torch.cat([ctx.model(x[i:i + 256].to(cfg.device)).argmax(1).cpu() for i in range(0, len(x), 256)])
    return x, y


def run_mixed(cfg: MixedConfig, progress: bool = True, context: PTQContext | None = None) -> MixedResult:
    """Allocate bits under ``cfg``'s constraints and evaluate the allocation (and the baselines)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    spec = cfg.resolved_backend()
    if context is None or context.key != context_key(cfg):
        context = build_context(cfg, progress)
    allowed = cfg.bit_set()
    for b in allowed:  # every allowed bit-width must be one the backend accepts, before any work
        cfg.model_copy(update={"w_bits": b, "a_bits": b}).resolved_backend()
    notes: list[str] = []
    images, labels = _train_set(cfg, context)
    probe = prepare(context.model, spec, context.example, cfg.w_observer, cfg.a_observer,
                    cfg.w_observer_options, cfg.a_observer_options)
    layers = list_layers(probe)
    first, last = layers[0].name, layers[-1].name
    edge_inputs = {layers[0].input_quantizer, layers[-1].input_quantizer} - {""}
    kept_float = {n.name for n in layers if n.kept_float}
    w_sizes = {n: int(m.module.weight.numel()) for n, m in weight_layers(probe)}
    a_sizes = _elements(probe, context.example)
    out = cfg.first_last_budget == "out"
    w_names = [n.name for n in layers if not n.kept_float and not (out and n.name in (first, last))]
    a_names = [q for q in a_sizes if not (out and q in edge_inputs)]
    fixed = Allocation({n: EDGE_BITS for n in (first, last) if n not in kept_float} if out else {},
                       {q: EDGE_BITS for q in edge_inputs if q in a_sizes} if out else {})
    bw = w_names if cfg.learns_weights else []  # what the budget weighs
    ba = a_names if cfg.learns_activations or cfg.a_max_fmap is not None else []
    budget = Budget(tuple(bw), tuple(w_sizes[n] for n in bw), tuple(ba), tuple(a_sizes[q] for q in ba),
                    cfg.w_avg, cfg.a_avg, cfg.a_max_fmap, cfg.lam, cfg.lam)
    last_in = {layers[-1].input_quantizer: EDGE_BITS} if layers[-1].input_quantizer in a_sizes else {}
    analytic = Allocation()
    if cfg.a_max_fmap is not None:  # analytic allocation; in learned mode, the check that the budget is feasible
        bits, capped = analytic_max_fmap({q: a_sizes[q] for q in a_names} | {q: a_sizes[q] for q in last_in},
                                         cfg.a_max_fmap, allowed, last_in)
        if cfg.fmap_mode == "analytic":
            analytic = Allocation({}, bits)
        if capped and cfg.fmap_mode == "analytic":
            notes.append(f"{len(capped)} activation(s) fit more than {allowed[-1]} bits and were capped at "
                         f"{allowed[-1]} (the largest bit-width allowed / supported)")

    def searchable() -> Searchable:
        gm = prepare(context.model, spec, context.example, cfg.w_observer, cfg.a_observer, cfg.w_observer_options,
                     cfg.a_observer_options, overrides=[*fixed.overrides(), *analytic.overrides()])
        # the images run_ptq calibrates on, so the search sees the grids the final model gets
        calibrate(gm, make_loader(calibration_subset(context.bundle, cfg.calib_size, cfg.seed), cfg.calib_batch_size),
                  cfg.device, False)
        start = cfg.init_bits if cfg.init_bits is not None else allowed[-1]
        return attach(gm, w_names if cfg.learns_weights else [], a_names if cfg.learns_activations else [],
                      allowed, start, bool(spec.deployable), cfg.estimator == "dither",
                      Allocation(dict(fixed.weights), {**fixed.activations, **analytic.activations}))

    report: SearchReport | None = None
    learned = Allocation()
    if cfg.learns_weights or cfg.learns_activations:
        s = searchable()
        learned, report = learn(s, budget, images, labels, cfg, cfg.device, progress)
        if report.repaired:
            notes.append("no training step met the constraints; the last allocation was lowered until it did")
    final = Allocation({**fixed.weights, **learned.weights}, {**fixed.activations, **analytic.activations,
                                                              **learned.activations})
    ptq = run_ptq(_ptq_config(cfg, final), progress=progress, context=context)
    result = MixedResult(cfg.model_dump(), ptq, final, budget.averages(final.weights, final.activations),
                         _constraint(cfg, budget), report, 0.0, notes,
                         layer_sizes={"weights": w_sizes, "activations": a_sizes})
    result.averages["satisfied"] = budget.satisfied(final.weights, final.activations)  # type: ignore[assignment]

    def evaluate(name: str, alloc: Allocation) -> None:
        """A baseline allocation as a PTQ run, into ``result.baselines``."""
        r = run_ptq(_ptq_config(cfg, alloc), progress=progress, context=context)
        result.baselines[name] = {"quant_top1": r.quant_top1, "agreement": r.agreement,
                                  **budget.averages(alloc.weights, alloc.activations), "allocation": alloc.to_dict()}

    if cfg.baselines and (cfg.learns_weights or cfg.learns_activations):
        s = searchable()  # freshly calibrated: the baselines must not inherit the search's learned ranges
        uni = uniform(s, budget, allowed)
        greedy, _ = sensitivity_greedy(s, budget, images[:cfg.sensitivity_images], labels[:cfg.sensitivity_images],
                                       allowed, cfg.device, progress)
        for name, alloc in (("uniform", uni), ("greedy", greedy)):
            evaluate(name, Allocation({**fixed.weights, **alloc.weights},
                                      {**fixed.activations, **analytic.activations, **alloc.activations}))
    elif cfg.baselines and cfg.a_max_fmap is not None:  # analytic: uniform activations that fit the budget
        e_max = max(a_sizes[q] for q in a_names if q not in last_in)
        ub = max([b for b in allowed if b * e_max <= 8 * cfg.a_max_fmap] or [allowed[0]])
        evaluate("uniform", Allocation(dict(fixed.weights), {**fixed.activations, **{q: ub for q in a_names},
                                                             **last_in}))
    result.seconds = time.perf_counter() - t0
    return result


def _constraint(cfg: MixedConfig, budget: Budget) -> dict[str, Any]:
    kind = ("max_fmap_" + cfg.fmap_mode) if cfg.a_max_fmap is not None else "average"
    return {"kind": kind, "w_avg": cfg.w_avg, "a_avg": cfg.a_avg, "a_max_fmap_bytes": cfg.a_max_fmap,
            "allowed": cfg.bit_set(), "allowed_kind": "set" if cfg.allowed else "any integer",
            "first_last": cfg.first_last_budget, "labels": cfg.labels, "images": cfg.images, "steps": cfg.steps,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "lambda": cfg.lam,
            "weights_in_budget": len(budget.w_names), "activations_in_budget": len(budget.a_names)}
