"""Backends are read from ``specs/*.yaml``: adding a backend means adding one file."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import ValidationError

from quantbench.backends.spec import BackendSpec
from quantbench.errors import ConfigError
from quantbench.utils.registry import Patterns, Registry

SPEC_DIR = Path(__file__).with_name("specs")


def read_spec(path: Path) -> BackendSpec:
    """Read and validate one backend YAML file."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read backend spec {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"backend spec {path} must be a YAML mapping")
    try:
        return BackendSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ConfigError(f"invalid backend spec {path}: {problems}") from None


@cache
def _builtin() -> Registry[BackendSpec]:
    specs: Registry[BackendSpec] = Registry("backend")
    for path in sorted(SPEC_DIR.glob("*.yaml")):
        spec = read_spec(path)
        if spec.name != path.stem:
            raise ConfigError(f"backend spec {path} declares name {spec.name!r}; it must match the file name")
        specs.add(spec.name, spec)
    return specs


def backend_names() -> list[str]:
    return _builtin().names()


def list_backends(filter: Patterns = None, exclude: Patterns = None, deployable: bool | None = None) -> list[str]:
    """Built-in backend names matching the globs (``utils.registry.Registry.list``), optionally only the
    deployable (or only the academic, ``deployable=False``) ones."""
    reg = _builtin()
    return [n for n in reg.list(filter, exclude) if deployable is None or reg.get(n).deployable == deployable]


def load_backend(name_or_path: str) -> BackendSpec:
    """A built-in backend by name, or a user spec from a ``.yaml`` path."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"backend spec file {path} does not exist")
        return read_spec(path)
    return _builtin().get(name_or_path)
