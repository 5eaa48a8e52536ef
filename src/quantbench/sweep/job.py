"""A job: one fully resolved run of a sweep, small and picklable so worker processes can take it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Job:
    """One run. ``config`` is what the run uses (real paths); ``identity`` is what ``run_id`` hashes."""

    run_id: str
    sweep: str
    method: str  # the method kind, a key of METHODS
    method_label: str
    config: dict[str, Any]
    identity: dict[str, Any]
    description: str
    plugins: tuple[str, ...] = field(default=())

    def columns(self) -> dict[str, Any]:
        """The store's scalar columns known before the run."""
        c = self.config
        return {"sweep": self.sweep, "method": self.method, "method_label": self.method_label, "model": c["model"],
                "data": c["data"], "backend": c["backend"], "w_bits": c.get("w_bits"), "a_bits": c.get("a_bits"),
                "seed": c.get("seed"), "config": {**c, "method": self.method}, "code_version":
                self.identity.get("code_version")}

    @property
    def uses_cuda(self) -> bool:
        """Whether the run's device is a CUDA GPU (it then takes one GPU)."""
        return str(self.config.get("device", "cpu")).startswith("cuda")

    def with_config(self, **updates: Any) -> Job:
        """A copy whose config has ``updates`` (the identity, hence the run id, is unchanged)."""
        return replace(self, config={**self.config, **updates})
