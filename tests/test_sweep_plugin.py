"""Not tests: a sweep plugin (``plugins: [tests.test_sweep_plugin]``) registering method kinds that the
sweep tests use to block, fail or kill their own process, plus the small sweeps they share and the
test side of the blocking handshake (:class:`Gate`)."""

from __future__ import annotations

import os
import queue
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from pydantic import Field

from quantbench.sweep.job import Job
from quantbench.sweep.methods import METHODS, ContextCache, MethodOutcome, MethodParams, register_method
from quantbench.sweep.methods.ptq import PTQMethod, PTQParams

PLUGIN = "tests.test_sweep_plugin"


class FaultParams(PTQParams):
    """PTQ that, on the backends named in ``faults``, raises, SIGKILLs its own process or blocks at the
    :class:`Gate` in the folder ``gate`` until the test releases it."""

    kind: Literal["fault_test"] = "fault_test"  # type: ignore[assignment]
    faults: dict[str, Literal["raise", "kill", "block"]] = Field(default_factory=dict)
    gate: str | None = None


def wait_at_gate(folder: Path, run_id: str) -> None:
    """Run side of :class:`Gate`: announce ``PID RUN_ID`` on the ``ready`` FIFO, then block until the test
    opens this process's ``release-PID`` FIFO (a signal such as SIGINT interrupts the wait, whichever thread of
    the process the kernel delivers it to)."""
    release = folder / f"release-{os.getpid()}"
    if not release.exists():
        os.mkfifo(release)
    with open(folder / "ready", "w") as f:  # blocks until the test's reader thread opens it
        f.write(f"{os.getpid()} {run_id}\n")
    # The blocking open of the release FIFO happens in a helper thread: the kernel may deliver SIGINT to any
    # thread of the process (torch's, the orphan watchdog), and a main thread stuck in open() would then never
    # see it. Waking the main thread every 0.1 s lets Python run the handler whichever thread got the signal.
    released = threading.Event()

    def block() -> None:
        with open(release) as f:  # blocks until the test opens it for writing
            f.read()
        released.set()

    threading.Thread(target=block, daemon=True, name="gate-release").start()
    while not released.wait(0.1):
        pass


class Gate:
    """Test side of a blocking handshake with ``fault_test`` runs whose fault is ``block``.

    Each such run announces itself (``PID RUN_ID`` on the ``ready`` FIFO, read here by a daemon thread into
    a queue) and then blocks until :meth:`release` is called for its process. No sleeps: the test waits on
    the queue, bounded, and the runs wait on FIFOs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        os.mkfifo(folder / "ready")
        self._arrivals: queue.Queue[tuple[int, str]] = queue.Queue()
        self._open = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            with open(self.folder / "ready") as f:  # one writer at a time, each writes one line
                for line in f:
                    pid, run_id = line.split()
                    if self._open.is_set():
                        self.release(int(pid))
                    else:
                        self._arrivals.put((int(pid), run_id))

    def open(self) -> None:
        """From now on every run that arrives goes straight through."""
        self._open.set()

    def wait(self, timeout: float = 150.0, alive: Any = None) -> tuple[int, str]:
        """The next ``(pid, run_id)`` to arrive at the gate; fails after ``timeout`` seconds."""
        try:
            return self._arrivals.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no run reached the gate in {timeout} s{alive() if alive else ''}") from None

    def release(self, pid: int) -> None:
        """Let the run blocked in process ``pid`` go on (it opened ``release-PID`` for reading)."""
        with open(self.folder / f"release-{pid}", "w"):
            pass


if "fault_test" not in METHODS:

    @register_method
    class FaultMethod(PTQMethod):
        name = "fault_test"
        params_type = FaultParams
        description = "test-only: PTQ with injected blocking and faults"
        own_keys = frozenset({"faults", "gate"})

        def config_fields(self, params: MethodParams) -> dict[str, Any]:
            assert isinstance(params, FaultParams)
            return {**super().config_fields(params), "faults": dict(params.faults), "gate": params.gate}

        def run(self, job: Job, cache: ContextCache) -> MethodOutcome:
            c = job.config
            fault = c["faults"].get(c["backend"])
            if fault == "block":
                wait_at_gate(Path(c["gate"]), job.run_id)
            if fault == "raise":
                raise RuntimeError("injected failure for the test")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return super().run(job, cache)


class LeakyParams(PTQParams):
    """A method parameter that PTQConfig does not have and the method does not declare it consumes."""

    kind: Literal["leaky_test"] = "leaky_test"  # type: ignore[assignment]
    leak: int = 0


if "leaky_test" not in METHODS:

    @register_method
    class LeakyMethod(PTQMethod):
        name = "leaky_test"
        params_type = LeakyParams
        description = "test-only: PTQ with a parameter that would be silently dropped"

        def config_fields(self, params: MethodParams) -> dict[str, Any]:
            assert isinstance(params, LeakyParams)
            return {**super().config_fields(params), "leak": params.leak}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Import into a test module: one torch thread there (tiny models on busy cores run far faster)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def tiny_sweep(name: str = "tiny", backends: list[str] | None = None, methods: list[dict[str, Any]] | None = None,
               bits: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A fast sweep on the randomly initialised digits CNN (no training): few calibration and test images."""
    return {
        "name": name,
        "plugins": [PLUGIN],
        "models": [{"model": "digits_cnn", "weights": None, "data": "digits"}],
        "backends": backends or ["tensorrt", "academic"],
        "methods": methods or [{"kind": "ptq", "calibrator": "minmax", "calib_size": 32, "calib_batch_size": 32}],
        "bits": bits or ["W8A8"],
        "settings": {"max_test": 64, "eval_batch_size": 64},
        **extra,
    }
