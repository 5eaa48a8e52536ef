"""Expand a sweep into jobs: the cartesian product, checked for impossible combinations, deduplicated."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from quantbench.backends import BackendSpec, load_backend
from quantbench.data import DATASETS, parse_spec
from quantbench.errors import QuantbenchError, SweepError
from quantbench.models import get_entry
from quantbench.sweep.identity import code_version, data_fingerprint, run_id, weights_identity
from quantbench.sweep.job import Job
from quantbench.sweep.load import Sweep
from quantbench.sweep.methods import METHODS, MethodParams
from quantbench.sweep.pareto import dual_combinations, front_combinations
from quantbench.sweep.schema import DEFAULT, TRAIN, Bits, ModelEntry
from quantbench.sweep.weights import train_recipe


@dataclass(frozen=True)
class Combination:
    """One point of the sweep's product, before it becomes a job."""

    model: ModelEntry
    weights: str | None
    data: str
    backend: str
    method: MethodParams
    bits: Bits
    first_last: Any
    residual: str
    skip: str
    seed: int
    deploy: bool
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)  # config entries of its own (a Pareto cell's width, overrides)
    invalid: str | None = None  # why it cannot run, found while it was made

    def describe(self) -> str:
        parts = [self.model.model, Path(self.backend).stem if self.backend.endswith(".yaml") else self.backend,
                 self.method.display(), f"W{self.bits.w or '-'}A{self.bits.a or '-'}"]
        if self.model.width_mult != 1.0:
            parts.append(f"width {self.model.width_mult:g}")
        for o in self.extra.get("overrides", []):
            parts.append(f"{o['match']} W{o['w_bits']}")
        for name, value in (("first_last", self.first_last), ("residual", self.residual), ("skip", self.skip)):
            if value != DEFAULT:
                parts.append(f"{name}={value}")
        parts.append(f"seed {self.seed}")
        return " × ".join(parts)


@dataclass
class Invalid:
    """A combination that cannot run, and why."""

    description: str
    reason: str


@dataclass
class Expansion:
    jobs: list[Job] = field(default_factory=list)
    invalid: list[Invalid] = field(default_factory=list)
    duplicates: int = 0


def _none_if_default(v: Any) -> Any:
    return None if v == DEFAULT else v


def resolve_spec(c: Combination) -> BackendSpec:
    from quantbench.backends import LayerOverride

    return load_backend(c.backend).configure(
        w_bits=c.bits.w, a_bits=c.bits.a, first_last=_none_if_default(c.first_last),
        residual=_none_if_default(c.residual), skip=_none_if_default(c.skip),
        overrides=[LayerOverride.model_validate(o) for o in c.extra.get("overrides", [])],
        binary_weights=METHODS.get(c.method.kind).binary_weights(c.method) or None,
    )


# -- impossible combinations: each check returns the reason or None -------------------------------
def _check_made_invalid(c: Combination) -> str | None:
    return c.invalid


def _check_deployable(c: Combination) -> str | None:
    spec = load_backend(c.backend)
    if c.deploy and not spec.deployable:
        why = getattr(spec, "not_deployable_because", "") or "it is an academic setting"
        return f"backend {c.backend!r} is not deployable ({why.strip()}) but the sweep sets deploy: true"
    return None


def _check_backend_options(c: Combination) -> str | None:
    try:
        resolve_spec(c)
    except (ValueError, ValidationError) as exc:
        first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
        return f"backend {c.backend!r} cannot run these options: {first.removeprefix('Value error, ')}"
    return None


def _check_data_matches_model(c: Combination) -> str | None:
    kind = DATASETS.get(parse_spec(c.data)[0])
    channels = get_entry(c.model.model).input_size[0]
    if kind.channels != channels:
        return (f"dataset {c.data!r} has {kind.channels}-channel images but model {c.model.model!r} expects "
                f"{channels} channels")
    _, path = parse_spec(c.data)
    if path is not None and not path.exists():
        return f"dataset path {path} does not exist"
    return None


def _check_weights_exist(c: Combination) -> str | None:
    if c.weights is not None and not c.weights.startswith("train:") and not Path(c.weights).is_file():
        return f"weights file {c.weights} does not exist"
    return None


def _check_device(c: Combination) -> str | None:
    if c.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "settings.device is cuda but no CUDA GPU is available (use device: cpu)"
    return None


#: Checks run in order on every combination; add one function to refuse a new kind of combination.
CHECKS: list[Callable[[Combination], str | None]] = [
    _check_made_invalid, _check_deployable, _check_backend_options, _check_data_matches_model, _check_weights_exist,
    _check_device,
]


def _path(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _data(base: Path, spec: str) -> str:
    kind, path = parse_spec(spec)
    return spec if path is None else f"{kind}:{_path(base, str(path))}"


def _weights(base: Path, m: ModelEntry, data: str) -> str | None:
    if m.weights is None:
        return None
    if m.weights == TRAIN:
        return train_recipe(m.model, data)
    return _path(base, m.weights)


def _config(c: Combination, spec: BackendSpec, sweep: Sweep) -> dict[str, Any]:
    s = sweep.spec.settings
    return {
        "model": c.model.model, "weights": c.weights, "data": c.data, "width_mult": c.model.width_mult,
        "backend": c.backend, "w_bits": spec.weight.bits, "a_bits": spec.activation.bits,
        "first_last": _none_if_default(c.first_last), "residual": _none_if_default(c.residual),
        "skip": _none_if_default(c.skip), "seed": c.seed, "device": s.device,
        "eval_batch_size": s.eval_batch_size, "max_test": s.max_test,
        **METHODS.get(c.method.kind).config_fields(c.method), **c.extra,
    }


def _job(c: Combination, sweep: Sweep) -> Job:
    spec = resolve_spec(c)
    config = _config(c, spec, sweep)
    method = METHODS.get(c.method.kind)
    reason = method.check(config)
    if reason:
        raise SweepError(reason)
    identity = {**config, "weights": weights_identity(config["weights"]), "data": data_fingerprint(config["data"]),
                "backend": spec.name, "backend_spec": spec.model_dump(mode="json"), "method": c.method.kind,
                "code_version": code_version(tuple(sweep.spec.plugins))}
    return Job(run_id=run_id(identity), sweep=sweep.spec.name, method=c.method.kind,
               method_label=c.method.display(), config=config, identity=identity, description=c.describe(),
               plugins=tuple(sweep.spec.plugins))


def combinations(sweep: Sweep) -> list[Combination]:
    """Every point of the sweep's product, in file order, then the points of its ``pareto:`` section."""
    s, base = sweep.spec, sweep.base_dir
    backends = s.backend_list(lambda b: _path(base, b))
    out = []
    for m, backend, method, bits, fl, res, sk, seed in itertools.product(
        s.models, backends, sweep.methods, s.bits, s.first_last, s.residual, s.skip, s.seeds
    ):
        data = _data(base, m.data)
        out.append(Combination(m, _weights(base, m, data), data, backend, method, bits, fl, res, sk, seed, s.deploy,
                               s.settings.device))
    return front_combinations(sweep, out) + dual_combinations(sweep, out, resolve_spec)


def expand(sweep: Sweep, on_invalid: str = "refuse", combos: list[Combination] | None = None) -> Expansion:
    """The sweep's jobs (of ``combos``; default: :func:`combinations`). Impossible combinations raise SweepError
    (``refuse``) or are left out (``skip``)."""
    if on_invalid not in ("refuse", "skip"):
        raise SweepError(f"on_invalid must be 'refuse' or 'skip', got {on_invalid!r}")
    out = Expansion()
    seen: set[str] = set()
    for c in combinations(sweep) if combos is None else combos:
        reason = next((r for check in CHECKS if (r := check(c))), None)
        if reason is None:
            try:
                job = _job(c, sweep)
            except (QuantbenchError, ValueError, ValidationError) as exc:
                reason = str(exc)
        if reason is not None:
            out.invalid.append(Invalid(c.describe(), reason))
            continue
        if job.run_id in seen:
            out.duplicates += 1
            continue
        seen.add(job.run_id)
        out.jobs.append(job)
    if out.invalid and on_invalid == "refuse":
        shown = "\n".join(f"  {i.description}: {i.reason}" for i in out.invalid[:20])
        more = f"\n  ... and {len(out.invalid) - 20} more" if len(out.invalid) > 20 else ""
        raise SweepError(f"{sweep.source}: {len(out.invalid)} of {len(out.invalid) + len(out.jobs)} combinations "
                         f"cannot run:\n{shown}{more}\n(pass --on-invalid skip to run the others)")
    return out
