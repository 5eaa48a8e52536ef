"""Read a sweep YAML file into a validated :class:`Sweep`; every problem is reported with its location."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from quantbench.errors import QuantbenchError, SweepError
from quantbench.sweep.methods import METHODS, MethodParams
from quantbench.sweep.schema import ModelEntry, Settings, SweepFile


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file, its parsed method entries and the folder relative paths start from."""

    spec: SweepFile
    methods: list[MethodParams]
    base_dir: Path
    source: str


#: The pydantic model found at each location of a sweep file, to list the allowed keys.
_MODELS_AT: dict[str, type[BaseModel]] = {"": SweepFile, "models": ModelEntry, "settings": Settings}


def _allowed(loc: tuple[Any, ...], model: type[BaseModel] | None = None) -> str:
    if model is None:
        parent = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
        model = _MODELS_AT.get(parent)
    return f"; allowed keys: {', '.join(model.model_fields)}" if model else ""


def _where(prefix: str, loc: tuple[Any, ...]) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        else:
            parts.append(str(p))
    return ".".join(parts) or "sweep"


def format_errors(exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """One line per problem; unknown keys are named together with the keys allowed there."""
    lines = []
    for e in exc.errors():
        loc = tuple(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {_where(prefix, loc[:-1])}: unknown key {loc[-1]!r}{_allowed(loc, model)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {_where(prefix, loc)}: {msg} (got {e.get('input')!r})")
    return lines


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import plugin modules (they register extra method kinds)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise SweepError(f"sweep plugin {name!r} cannot be imported: {exc}") from exc


def parse_sweep(data: Any, base_dir: Path, source: str = "<sweep>") -> Sweep:
    """Validate a sweep given as a mapping (what the YAML file holds)."""
    if not isinstance(data, dict):
        raise SweepError(f"{source}: a sweep file must be a YAML mapping with keys like name, models, backends, "
                         "methods, bits")
    try:
        spec = SweepFile.model_validate(data)
    except ValidationError as exc:
        raise SweepError(f"{source} is not a valid sweep:\n" + "\n".join(format_errors(exc))) from None
    import_plugins(spec.plugins)
    methods, problems = [], []
    for i, entry in enumerate(spec.methods):
        kind = entry.get("kind", "ptq")
        try:
            method = METHODS.get(kind)
        except QuantbenchError as exc:
            problems.append(f"  methods[{i}].kind: {exc}")
            continue
        try:
            methods.append(method.parse({**entry, "kind": kind}))
        except ValidationError as exc:
            problems += format_errors(exc, f"methods[{i}]", method.params_type)
    if problems:
        raise SweepError(f"{source} is not a valid sweep:\n" + "\n".join(problems))
    return Sweep(spec, methods, base_dir, source)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SweepError(f"cannot read sweep file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SweepError(f"sweep file {path} is not valid YAML: {exc}") from exc
    return parse_sweep(data, path.resolve().parent, str(path))
