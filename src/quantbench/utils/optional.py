"""Optional dependencies (extras): import one, or say which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from quantbench.errors import ConfigError


def require_module(name: str, needed_by: str, extra: str) -> ModuleType:
    """Module ``name``, or a :class:`ConfigError` saying that ``needed_by`` needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"{needed_by} needs {name}, which is not installed here; install the extra: "
                          f"pip install 'quantbench[{extra}]'") from None
