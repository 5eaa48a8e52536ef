"""Turn quantbench's input errors into one clear message and exit code 2 (no traceback)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from quantbench.errors import QuantbenchError

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def _print_error(message: str) -> None:
    # plain Text: messages hold key lists in brackets that rich would take for markup; no hard wraps
    err_console.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True, highlight=False)


def friendly_errors(fn: F) -> F:
    """Decorator for CLI commands."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            _print_error(format_validation_error(exc))
        except QuantbenchError as exc:
            _print_error(str(exc))
        raise typer.Exit(code=2)

    return wrapper  # type: ignore[return-value]
