"""User-facing errors. Each message names the problem and the fix."""

from __future__ import annotations


class QuantbenchError(Exception):
    """Base class for every error quantbench raises on bad input."""


class UnknownNameError(QuantbenchError, KeyError):
    """A name that is not in a registry (model, backend, observer, dataset...)."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind, self.name, self.valid = kind, name, valid
        super().__init__(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self.args[0]


class ConfigError(QuantbenchError, ValueError):
    """A configuration value that is out of range or inconsistent."""


class NonFiniteError(QuantbenchError, ValueError):
    """NaN or inf reached an observer."""


class EmptyCalibrationError(QuantbenchError, ValueError):
    """An observer or the calibration loop saw no data."""


class TraceError(QuantbenchError, RuntimeError):
    """torch.fx could not trace the model."""


class CheckpointError(QuantbenchError, ValueError):
    """Checkpoint keys or shapes do not match the model."""


class DataError(QuantbenchError, ValueError):
    """A data path that does not exist or is not in the expected format."""


class StoreError(QuantbenchError, RuntimeError):
    """The results store cannot be opened, read or written; nothing in it was changed."""


class StoreVersionError(StoreError):
    """The store was created by a newer quantbench schema than this one reads."""


class SweepError(QuantbenchError, ValueError):
    """A sweep file that cannot be read, has unknown keys or impossible combinations."""
