"""Options shared by the CLI commands: the quantization options (model, data, bits, policies...) and those of
the sweep and results commands (``--out``, ``--store``, and the store they open)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from quantbench.backends.overrides import LayerOverride
from quantbench.errors import ConfigError
from quantbench.store import ResultsStore, open_store, resolve_store_url
from quantbench.utils.io import OutputError, check_output

DEFAULT_OUT = Path("quantbench-out")

OutOpt = Annotated[Path, typer.Option("--out", help="output folder (store, cards, report)")]
StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="results store: a SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db) or an SQLite file; "
                    "default OUT/quantbench.db")]


def open_results(out: Path, store: str | None, create: bool) -> ResultsStore:
    """The store the user pointed at; read-only commands (``create`` False) never create one."""
    return open_store(resolve_store_url(store, out), create=create)


# ------------------------------------------------------------------- options of the quantization commands
class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class PolicyOpt(str, Enum):
    quantized = "quantized"
    fp = "fp"


ModelOpt = Annotated[str | None, typer.Option(help="model name (see `quantbench models`)")]
DataOpt = Annotated[str | None, typer.Option(help="dataset: cifar10:PATH, imagefolder:PATH or digits")]
WeightsOpt = Annotated[str | None, typer.Option(help=".safetensors or torch checkpoint")]
WBitsOpt = Annotated[int | None, typer.Option(help="weight bits (default: the backend's)")]
ABitsOpt = Annotated[int | None, typer.Option(help="activation bits (default: the backend's)")]
WObserverOpt = Annotated[str, typer.Option(help="weight calibrator (see `quantbench observers`)")]
AObserverOpt = Annotated[str, typer.Option(help="activation calibrator (see `quantbench observers`)")]
CalibSizeOpt = Annotated[int, typer.Option(help="calibration images")]
BnCalibOpt = Annotated[bool, typer.Option("--bn-calib", help="re-estimate BN statistics (seed 001 C.3)")]
FirstLastOpt = Annotated[str | None, typer.Option(help="first/last layer: same, fp or bits")]
ResidualOpt = Annotated[PolicyOpt | None, typer.Option(help="residual add output: quantized or fp")]
SkipOpt = Annotated[PolicyOpt | None, typer.Option(help="branches entering an add: quantized or fp")]
WidthMultOpt = Annotated[float, typer.Option(help="width multiplier")]
CalibDataOpt = Annotated[str, typer.Option(help=(
    "calibration / reconstruction images: real, noise[:N] (Gaussian, the baseline) or synthetic:GENERATOR[:N] "
    "(zeroq, bns-ce, fdda: made from the model's BN statistics, cached)"))]
SeedOpt = Annotated[int, typer.Option(help="random seed")]
MaxTestOpt = Annotated[int | None, typer.Option(help="evaluate on the first N test images")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite --out even if it is not a previous result")]
LayerBitsOpt = Annotated[list[str] | None, typer.Option(
    "--layer-bits", help="per-layer bits, repeatable, later wins: PATTERN=4 (weights), PATTERN=w4a8, PATTERN=a8 or "
                         "PATTERN=fp; PATTERN is a module name glob ('layer3.*'), type:Conv2d or depthwise")]
OverridesOpt = Annotated[Path | None, typer.Option(
    "--overrides", help="YAML file with a list of per-layer overrides (before --layer-bits)")]

LAYER_BITS_FORMS = "PATTERN=BITS (weights), PATTERN=wBITSaBITS, PATTERN=wBITS, PATTERN=aBITS or PATTERN=fp"
_BITS_RE = re.compile(r"^(?:(?P<plain>\d+)|(?:w(?P<w>\d+))?(?:a(?P<a>\d+))?)$")


@dataclass(frozen=True)
class LayerBits:
    """One parsed ``PATTERN=VALUE`` of ``--layer-bits``: weight bits, activation bits or kept in float."""

    pattern: str
    w_bits: int | None = None
    a_bits: int | None = None
    keep_float: bool = False

    def to_override(self, option: str = "--layer-bits") -> LayerOverride:
        fields: dict[str, Any] = ({"keep_float": True} if self.keep_float else
                                  {k: v for k, v in (("w_bits", self.w_bits), ("a_bits", self.a_bits)) if v})
        try:
            return LayerOverride(match=self.pattern, **fields)
        except ValidationError as exc:
            raise ConfigError(f"{option} {self.pattern}=...: {exc.errors()[0]['msg']}") from None


def parse_layer_bits(item: str, option: str = "--layer-bits") -> LayerBits:
    """``PATTERN=4``, ``PATTERN=w4a8``, ``PATTERN=w4``, ``PATTERN=a8`` or ``PATTERN=fp``."""
    pattern, sep, value = item.partition("=")
    pattern, value = pattern.strip(), value.strip().lower()
    bad = ConfigError(f"{option} takes {LAYER_BITS_FORMS}, e.g. 'layer3.*=4' or 'fc=w8a8'; got {item!r}")
    if not sep or not pattern or not value:
        raise bad
    if value in ("fp", "float"):
        return LayerBits(pattern, keep_float=True)
    m = _BITS_RE.match(value)
    if m is None:
        raise bad
    plain, w, a = m.group("plain"), m.group("w"), m.group("a")
    w_bits = int(plain) if plain is not None else (int(w) if w is not None else None)
    a_bits = int(a) if a is not None else None
    if w_bits is None and a_bits is None:
        raise bad
    for b in (w_bits, a_bits):
        if b is not None and b < 1:
            raise ConfigError(f"{option} {item!r}: bits must be at least 1")
    return LayerBits(pattern, w_bits, a_bits)


def read_overrides(path: Path) -> list[LayerOverride]:
    """A YAML file holding a list of overrides (or a mapping with an ``overrides:`` list)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read --overrides {path}: {exc}") from None
    if isinstance(data, dict) and set(data) == {"overrides"}:
        data = data["overrides"]
    if not isinstance(data, list):
        raise ConfigError(f"--overrides {path} must hold a list of overrides (or a mapping with an 'overrides:' "
                          "list), each e.g. {match: 'layer3.*', w_bits: 4}")
    out = []
    for i, entry in enumerate(data):
        try:
            out.append(LayerOverride.model_validate(entry))
        except ValidationError as exc:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"--overrides {path}, entry {i + 1}: {msgs}") from None
    return out


def layer_overrides(overrides_file: Path | None, layer_bits: list[str] | None) -> list[LayerOverride]:
    """``--overrides FILE`` entries, then ``--layer-bits`` ones (so the command line wins)."""
    out = read_overrides(overrides_file) if overrides_file is not None else []
    return out + [parse_layer_bits(v).to_override() for v in layer_bits or []]


def parse_first_last(value: str | None) -> str | int | None:
    """``--first-last``: 'same', 'fp' or a bit-width."""
    if value is None or value in ("same", "fp"):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"--first-last takes 'same', 'fp' or a bit-width, got {value!r}") from None


def policy(value: PolicyOpt | None) -> str | None:
    return value.value if value is not None else None


# ------------------------------------------------------------------------------------------ output files
def has_json_keys(path: Path, keys: frozenset[str]) -> bool:
    """Whether ``path`` holds a JSON object with (at least) ``keys``: a result a command wrote, safe to replace."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.keys() >= keys


def check_out(path: Path | None, what: str = "--out", *, force: bool = False,
              ours: Callable[[Path], bool] | None = None, kind: str = "quantbench output") -> None:
    """The pre-flight of every command that writes a file: call it before any work. Refuses a directory,
    device or FIFO, an unwritable or impossible folder, and (with ``ours``) an existing file that ``ours`` does
    not recognise as a previous output of the command, unless ``force``."""
    if path is None:
        return
    target = check_output(path, what)
    if ours is not None and not force and target.is_file() and target.stat().st_size > 0 and not ours(target):
        raise OutputError(f"{what} {path} exists and is not a {kind}; refusing to overwrite it: choose another "
                          "path or pass --force")
