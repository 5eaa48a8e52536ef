"""Backend specs and their CLI overrides: every impossible setting is refused at load, in one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from quantbench.backends import load_backend
from quantbench.cli.main import app
from quantbench.errors import ConfigError

runner = CliRunner()


def spec_file(tmp_path: Path, **weight: object) -> Path:
    data = load_backend("tensorrt").model_dump(mode="json")
    data["name"] = "mine"
    data["weight"].update(weight)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.fault(input="backend YAML with weight.ch_axis: 5", exit_code=2, kept="nothing run",
                   message="invalid backend spec PATH: spec: weight.ch_axis 5: conv and linear weights ... are "
                           "quantized per output channel, so the allowed values are 0")
@pytest.mark.parametrize("axis", [5, 1, -1])
def test_a_weight_channel_axis_the_layers_do_not_have_is_refused_at_load(tmp_path: Path, axis: int) -> None:
    path = spec_file(tmp_path, ch_axis=axis)
    with pytest.raises(ConfigError, match=rf"weight.ch_axis {axis}: .*allowed values are 0$"):
        load_backend(str(path))
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--backend", str(path)])
    assert res.exit_code == 2 and "weight.ch_axis" in res.output and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 2, res.output  # one message (rich may wrap a long path)


def test_the_output_channel_axis_loads(tmp_path: Path) -> None:
    assert load_backend(str(spec_file(tmp_path, ch_axis=0))).weight.ch_axis == 0
