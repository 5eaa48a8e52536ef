"""Worker processes end when the sweep process that started them dies (even by kill -9).

On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the worker receive SIGKILL when
its parent exits. (The signal follows the parent *thread* that forked the worker; ProcessPoolExecutor
starts spawn-context workers from the thread that submits, here the sweep's main thread, which lives as
long as the process.) Elsewhere, or where prctl is unavailable, a daemon thread polls ``os.getppid()``
once a second and exits the process when the parent is gone (the worker is re-parented).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
WATCHDOG_SECONDS = 1.0


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watchdog(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_SECONDS)
    os._exit(1)


def exit_with_parent(parent: int) -> str:
    """Make this process end when process ``parent`` (its parent) ends; returns the mechanism used."""
    mechanism = "prctl" if _set_pdeathsig() else "watchdog"
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    if mechanism == "watchdog":
        threading.Thread(target=_watchdog, args=(parent,), daemon=True, name="quantbench-orphan-watchdog").start()
    return mechanism
