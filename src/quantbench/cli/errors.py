"""Turn quantbench's input errors into one clear message and exit code 2 (no traceback)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from quantbench.errors import QuantbenchError

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True)


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n" + "\n".join(lines)


def friendly_errors(fn: F) -> F:
    """Decorator for CLI commands."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            err_console.print(f"[bold red]error:[/] {format_validation_error(exc)}", highlight=False)
        except QuantbenchError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=2)

    return wrapper  # type: ignore[return-value]
