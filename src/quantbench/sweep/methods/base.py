"""Method kinds of a sweep (PTQ today, QAT algorithms later) live in a registry, not an if-chain.

A method kind is a :class:`Method` with a pydantic parameter model; a sweep's ``methods:`` entries are
``{kind: NAME, ...params}``. Adding QAT means one new module that subclasses :class:`Method` and
calls :func:`register_method`; nothing else in the sweep, store or report changes.
"""

from __future__ import annotations

import contextlib
import tempfile
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from quantbench.sweep.job import Job
from quantbench.utils.registry import Registry

T = TypeVar("T")
C = TypeVar("C", bound=BaseModel)
#: keys a job's config may carry for the sweep rather than the method: where a run keeps its files (``run_dir``, for
#: methods with ``needs_run_dir``) and its place in a Pareto analysis (``pareto``, :mod:`quantbench.sweep.pareto`)
SWEEP_KEYS = frozenset({"run_dir", "pareto"})


class MethodParams(BaseModel):
    """Parameters of one method entry; subclasses add their fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    label: str | None = None

    def default_label(self) -> str:
        return self.kind

    def display(self) -> str:
        return self.label or self.default_label()


@dataclass
class MethodOutcome:
    """What a finished run reports: metrics (flat JSON) and its quantization card."""

    metrics: dict[str, Any]
    card: dict[str, Any]


class ContextCache:
    """Objects several runs in one process share (a loaded model and data, an epoch-time estimate)."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, build: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]  # type: ignore[no-any-return]
        value = build()
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value


class Method(ABC):
    """A kind of quantization run."""

    name: ClassVar[str]
    params_type: ClassVar[type[MethodParams]]
    description: ClassVar[str]
    #: True: the run keeps files (a trained checkpoint) in a folder the sweep gives it (``config["run_dir"]``)
    needs_run_dir: ClassVar[bool] = False

    def parse(self, data: dict[str, Any]) -> MethodParams:
        """Validate one ``methods:`` entry (raises pydantic ValidationError)."""
        return self.params_type.model_validate(data)

    def config_fields(self, params: MethodParams) -> dict[str, Any]:
        """The entries this method adds to a run's resolved config."""
        return params.model_dump(exclude={"kind", "label"})

    def binary_weights(self, params: MethodParams) -> bool:
        """Whether this entry makes 1-bit weights binary, {-1, +1}·s (a QAT rule that learns them)."""
        return False

    def check(self, config: dict[str, Any]) -> str | None:
        """Why this resolved config cannot run (an impossible combination), or None."""
        return None

    def run_dir_name(self, job: Job) -> str:
        """The name of the folder a ``needs_run_dir`` job keeps its files in: its run id (runs that share a
        training, one per evaluated bit-width, share a name)."""
        return job.run_id

    @abstractmethod
    def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
        """Run the job in this process and return its metrics and card; raise on failure."""


def training_config(method: str, cls: type[C], data: dict[str, Any], out_dir: str | None) -> C:
    """A training method's run configuration (``cls``: QATConfig or a subclass) from a job's config ``data``
    (without the sweep's keys), validated and checked; every problem is a SweepError naming the method."""
    from pydantic import ValidationError

    from quantbench.errors import ConfigError, SweepError

    unknown = sorted(set(data) - set(cls.model_fields))
    if unknown:
        raise SweepError(f"method {method!r} gives keys that {cls.__name__} does not have: {', '.join(unknown)}")
    try:
        return cls.model_validate({**data, "out_dir": out_dir}).check()  # type: ignore[attr-defined,no-any-return]
    except ValidationError as exc:
        first = exc.errors()[0]
        raise SweepError(f"method {method!r}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except ConfigError as exc:
        raise SweepError(f"method {method!r}: {exc}") from None


@contextlib.contextmanager
def run_folder(job: Job) -> Iterator[tuple[Path, bool]]:
    """``(folder, kept)``: where a training job keeps its files, the sweep's ``config["run_dir"]`` (kept), or with
    none a temporary folder removed afterwards."""
    run_dir = job.config.get("run_dir")
    if run_dir is not None:
        yield Path(run_dir), True
        return
    with tempfile.TemporaryDirectory(prefix=f"quantbench-{job.method}-") as tmp:  # no checkpoint to keep
        yield Path(tmp) / "run", False


#: the finished training's checkpoint in a run folder
FINAL = "final.pt"


def same_training(path: Any, cfg: Any) -> bool:
    """Whether the checkpoint at ``path`` was written by a training of ``cfg``'s identity (an unreadable one is
    trained again, never trusted)."""
    from quantbench.qat.checkpoint import load_checkpoint

    try:
        saved = load_checkpoint(path)["config"]
    except Exception:
        return False
    return bool(type(cfg).model_validate(saved).identity() == cfg.identity())


def train_once(run_dir: Path, cfg: Any, train: Callable[..., Any]) -> bool:
    """Make ``run_dir`` hold ``cfg``'s finished training: reuse its ``final.pt`` when that is of the same identity
    (returns True), else ``train(cfg, resume=..., overwrite=..., progress=False)``, resuming an interrupted
    training of the same identity from its epoch checkpoint (returns False)."""
    from quantbench.qat.train import CHECKPOINT

    if (run_dir / FINAL).is_file() and same_training(run_dir / FINAL, cfg):
        return True
    resume = (run_dir / CHECKPOINT).is_file() and same_training(run_dir / CHECKPOINT, cfg)
    train(cfg, resume=resume, overwrite=not resume, progress=False)
    return False


METHODS: Registry[Method] = Registry[Method]("method kind")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add one instance of ``cls`` to :data:`METHODS` under ``cls.name``."""
    METHODS.add(cls.name, cls())
    return cls
