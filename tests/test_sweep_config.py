"""One config source: a sweep's PTQ methods and settings are PTQConfig's fields (same defaults and
constraints), no key is silently dropped, and a PTQ run prepares its model once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import quantbench
from quantbench.config import PTQConfig, QuantRunConfig, default_of
from quantbench.errors import SweepError
from quantbench.sweep.execute import execute
from quantbench.sweep.expand import expand
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.methods import ContextCache
from quantbench.sweep.methods.ptq import PTQParams
from quantbench.sweep.schema import Settings
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

SRC = Path(quantbench.__file__).parent


@pytest.mark.fault(input="a sweep method whose config carries a key PTQConfig does not have (a plugin's parameter)",
                   message="method 'leaky_test' gives keys that PTQConfig does not have: 'leak' ...",
                   exit_code=2, kept="nothing is run or created")
def test_a_method_key_that_ptqconfig_does_not_know_is_refused_by_name(tmp_path):
    data = tiny_sweep(methods=[{"kind": "leaky_test", "calibrator": "minmax", "leak": 3}])
    with pytest.raises(SweepError, match="PTQConfig does not have: 'leak'"):
        expand(parse_sweep(data, tmp_path))


@pytest.mark.fault(input="a sweep method entry with an unknown key (`calib_sise: 64`)",
                   message="methods[0]: unknown key 'calib_sise'", exit_code=2, kept="nothing is run or created")
def test_an_unknown_method_key_is_refused_by_name(tmp_path):
    data = tiny_sweep(methods=[{"kind": "ptq", "calibrator": "minmax", "calib_sise": 64}])
    with pytest.raises(SweepError, match="methods\\[0\\]: unknown key 'calib_sise'"):
        parse_sweep(data, tmp_path)


def test_sweep_fields_are_ptqconfig_fields():
    for name in ("calib_size", "calib_batch_size", "bn_calib", "bn_calib_size", "w_observer_options"):
        assert repr(PTQParams.model_fields[name]) == repr(PTQConfig.model_fields[name]), name
    for name in ("device", "eval_batch_size", "max_test"):
        assert repr(Settings.model_fields[name]) == repr(QuantRunConfig.model_fields[name]), name
    assert PTQParams(calibrator=None).observers == (default_of(PTQConfig, "w_observer"),
                                                    default_of(PTQConfig, "a_observer"))


def test_run_defaults_are_written_once():
    """No module other than config.py spells a default for the shared run fields."""
    pattern = re.compile(r"\b(calib_size|calib_batch_size|eval_batch_size)\b[^=\n]*=\s*(Field\(\s*)?\d")
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if p.name != "config.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, f"defaults written outside config.py: {offenders}"


def test_a_ptq_run_of_a_sweep_prepares_its_model_once(tmp_path, monkeypatch):
    import quantbench.ptq.pipeline as pipeline
    import quantbench.sweep.methods.ptq as ptq_method

    calls: list[int] = []
    real = pipeline.prepare

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", counting)
    monkeypatch.setattr(ptq_method, "prepare", counting, raising=False)
    job = expand(parse_sweep(tiny_sweep(backends=["tensorrt"]), tmp_path)).jobs[0]
    record = execute(job, ContextCache())
    assert record.status == "done", record.error
    assert len(calls) == 1
    assert record.card is not None and record.metrics["model_size_bytes"] > 0
