"""Options shared by the CLI commands: the quantization options (model, data, bits, policies...) and those of
the sweep and results commands (``--out``, ``--store``, and the store they open)."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

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
SeedOpt = Annotated[int, typer.Option(help="random seed")]
MaxTestOpt = Annotated[int | None, typer.Option(help="evaluate on the first N test images")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars")]
ForceOpt = Annotated[bool, typer.Option("--force", help="overwrite --out even if it is not a previous result")]


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
