"""One config source: the CLI's defaults are PTQConfig's (a default written twice would drift)."""

from __future__ import annotations

from enum import Enum

import pytest
import typer

from quantbench.cli.main import app
from quantbench.config import PTQConfig

FIELDS = PTQConfig.model_fields
# deliberate differences: export's default backend is the deployable one
DIFFERENT = {"export": {"backend"}}


@pytest.mark.parametrize("command", ["ptq", "export"])
def test_cli_defaults_equal_the_config_defaults(command: str) -> None:
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    checked = 0
    for p in cmd.params:
        if p.name not in FIELDS or p.default is None or p.name in DIFFERENT.get(command, set()):
            continue
        default = p.default.value if isinstance(p.default, Enum) else p.default
        assert default == FIELDS[p.name].default, f"{command} --{p.name}: {default!r} != PTQConfig's"
        checked += 1
    assert checked >= 5
