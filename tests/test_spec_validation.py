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


@pytest.mark.fault(input="ptq --backend tensorrt --w-bits 1 (or --a-bits 1)", exit_code=2, kept="nothing run",
                   message="--w-bits 1: tensorrt's signed symmetric weights at 1 bit have the grid {-1, 0}·s, which "
                           "zeroes every positive weight: use at least 2 bits (binary or ternary weights: "
                           "`quantbench qat --algorithm binary` or `gaussian` make 1-bit weights binary, {-1, +1}·s)")
@pytest.mark.parametrize(("flag", "role"), [("--w-bits", "weight"), ("--a-bits", "activation")])
def test_signed_symmetric_one_bit_is_refused_naming_the_option(flag: str, role: str) -> None:
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--backend", "tensorrt", flag, "1"])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert line.startswith(f"error: {flag} 1: tensorrt's signed symmetric {role}s at 1 bit")
    assert "{-1, 0}" in line and "at least 2 bits" in line and "binary" in line


@pytest.mark.fault(input="ptq --backend onnxruntime --w-bits 1", exit_code=2, kept="nothing run",
                   message="--w-bits 1: onnxruntime's weights: narrow_range needs bits >= 2 (a 1-bit narrow signed "
                           "range is empty)")
def test_a_spec_override_error_is_one_line_naming_the_cli_option() -> None:
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--backend", "onnxruntime",
                              "--w-bits", "1"])
    assert res.exit_code == 2, res.output
    line = " ".join(res.output.split())
    assert line == ("error: --w-bits 1: onnxruntime's weights: narrow_range needs bits >= 2 (a 1-bit narrow signed "
                    "range is empty)"), res.output
    with pytest.raises(ConfigError, match=r"^--a-bits 1: tensorrt's"):
        load_backend("tensorrt").configure(a_bits=1)
