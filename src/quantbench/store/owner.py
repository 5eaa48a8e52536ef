"""Who is running a stored run: ``HOST:PID:START`` of the process that claimed it, and whether it is gone.

A run left ``running`` by a process that died (kill -9, power loss) may be claimed again by a later
process. That is decided from the owner recorded in the row: on the same host, the owner is gone when
its pid no longer exists, is a zombie, or now belongs to a process with another start time (pid reuse).
An owner on another host cannot be checked from here, so its runs are never taken over automatically
(a sweep reports them as claimed elsewhere). Rows without an owner (stores written before schema
version 2) are reclaimable, as they were before.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return fields[19] if len(fields) > 19 else None


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    start: str  # empty where the start time is unknown

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.start}"

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        try:
            return cls(host, int(pid), rest)
        except ValueError:
            return None

    def is_gone(self) -> bool:
        """True only when this owner surely no longer runs (same host, process gone or pid reused)."""
        if self.host != _host():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        if _state(self.pid) == "Z":
            return True
        start = _start_time(self.pid)
        return bool(self.start) and start is not None and start != self.start


@cache
def _host() -> str:
    return socket.gethostname()


def current_owner() -> Owner:
    """This process as an owner (pid-dependent: evaluated per call, so forked children differ)."""
    return Owner(_host(), os.getpid(), _start_time(os.getpid()) or "")


def reclaimable(owner: str | None) -> bool:
    """Whether a ``running`` row with this owner may be claimed by another process."""
    if not owner:
        return True
    parsed = Owner.parse(owner)
    return parsed is not None and parsed.is_gone()
