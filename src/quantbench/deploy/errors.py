"""Errors of the deployment tools; each message names the problem and the fix."""

from __future__ import annotations

from quantbench.errors import QuantbenchError


class ExportError(QuantbenchError, ValueError):
    """The model cannot be exported as it is (uncalibrated, not deployable, unsupported bit-width...)."""


class NotOurOnnxError(QuantbenchError, ValueError):
    """An ONNX file that is unreadable or was not written by ``quantbench export``."""


class RuntimeUnavailableError(QuantbenchError, RuntimeError):
    """A runtime needed for a measurement is not installed or not usable on this machine."""
