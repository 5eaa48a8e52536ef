"""Sweep files: expansion, validation (unknown keys, unknown names, impossible combinations), run ids,
the method registry and determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from quantbench.errors import SweepError
from quantbench.sweep.execute import execute
from quantbench.sweep.expand import expand
from quantbench.sweep.load import load_sweep, parse_sweep
from quantbench.sweep.methods import METHODS, ContextCache
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)


def _parse(data: dict, tmp_path: Path = Path(".")) -> object:
    return parse_sweep(data, tmp_path, "sweep.yaml")


def test_expansion_is_the_product_and_ids_are_stable(tmp_path):
    data = tiny_sweep(backends=["tensorrt", "snpe", "academic"], bits=["W8A8", "W4A8"],
                      methods=[{"calibrator": "minmax"}, {"kind": "ptq", "w_observer": "minmax", "a_observer": "kld"}],
                      seeds=[0, 1])
    jobs = expand(_parse(data, tmp_path)).jobs
    assert len(jobs) == 3 * 2 * 2 * 2
    assert len({j.run_id for j in jobs}) == len(jobs)
    assert {j.method_label for j in jobs} == {"minmax", "minmax/kld"}
    assert {(j.config["w_bits"], j.config["a_bits"]) for j in jobs} == {(8, 8), (4, 8)}
    again = expand(_parse(data, tmp_path)).jobs
    assert [j.run_id for j in again] == [j.run_id for j in jobs], "run ids depend only on the resolved config"
    tweaked = expand(_parse({**data, "methods": [{"calibrator": "minmax", "calib_size": 64}]}, tmp_path)).jobs
    assert not {j.run_id for j in tweaked} & {j.run_id for j in jobs}, "any config change gives a new run id"


def test_default_bits_resolve_to_the_backend_and_duplicates_collapse(tmp_path):
    explicit = expand(_parse(tiny_sweep(bits=["W8A8"]), tmp_path)).jobs
    both = expand(_parse(tiny_sweep(bits=["default", "W8A8"]), tmp_path))
    assert [j.run_id for j in both.jobs] == [j.run_id for j in explicit]
    assert both.duplicates == len(explicit)


def test_yaml_file_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.safetensors").write_bytes(b"x")
    data = tiny_sweep()
    data["models"][0]["weights"] = "w/model.safetensors"
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    job = expand(load_sweep(path)).jobs[0]
    assert job.config["weights"] == str(tmp_path / "w" / "model.safetensors")
    assert job.identity["weights"].startswith("sha256:"), "identity uses content, not the path"


@pytest.mark.parametrize(("patch", "expected"), [
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"models": [{"model": "digits_cnn", "wieghts": None}]}, "models[0]: unknown key 'wieghts'"),
    ({"settings": {"device": "cpu", "batch": 3}}, "settings: unknown key 'batch'"),
    ({"methods": [{"kind": "ptq", "calibrater": "mse"}]}, "methods[0]: unknown key 'calibrater'"),
    ({"methods": [{"kind": "qat_lsq"}]}, "unknown method kind 'qat_lsq'"),
    ({"methods": [{"kind": "ptq", "calibrator": "maxmin"}]}, "unknown observer 'maxmin'"),
    ({"backends": ["tensorrt", "tensorflow"]}, "unknown backend 'tensorflow'"),
    ({"models": [{"model": "resnet99"}]}, "unknown model 'resnet99'"),
    ({"bits": ["W17A8"]}, "bits[0].w"),
    ({"bits": ["8bit"]}, "bits must look like 'W8A8'"),
    ({"first_last": [0]}, "first_last bits must be in 1..16"),
    ({"models": [{"model": "resnet20_cifar", "weights": "train", "data": "digits"}]}, "weights: train is only"),
])
def test_bad_sweep_files_are_refused_naming_the_problem(patch, expected, tmp_path):
    with pytest.raises(SweepError) as err:
        expand(_parse({**tiny_sweep(), **patch}, tmp_path))
    assert expected in str(err.value)


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(SweepError, match="cannot read sweep file"):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_sweep(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SweepError, match="must be a YAML mapping"):
        load_sweep(bad)


def test_impossible_combinations_are_named_and_refused_or_skipped(tmp_path):
    data = tiny_sweep(backends=["tensorrt", "academic", "onnxruntime"], bits=["W8A8", "W1A8"], deploy=True)
    with pytest.raises(SweepError) as err:
        expand(_parse(data, tmp_path), "refuse")
    msg = str(err.value)
    assert "digits_cnn × academic × minmax × W8A8" in msg and "not deployable" in msg
    assert "digits_cnn × onnxruntime × minmax × W1A8" in msg and "narrow_range" in msg
    assert "--on-invalid skip" in msg
    skipped = expand(_parse(data, tmp_path), "skip")
    described = {i.description.split(" × seed")[0] for i in skipped.invalid}
    assert "digits_cnn × academic × minmax × W1A8" in described
    assert "digits_cnn × tensorrt × minmax × W1A8" in described  # signed symmetric 1-bit: the grid {-1, 0}·s
    assert {(j.config["backend"], j.config["w_bits"]) for j in skipped.jobs} == {("tensorrt", 8), ("onnxruntime", 8)}


def test_model_data_mismatch_and_missing_weights_are_impossible_combinations(tmp_path):
    data = tiny_sweep()
    data["models"] = [{"model": "resnet20_cifar", "data": "digits"},
                      {"model": "digits_cnn", "weights": "nowhere.safetensors", "data": "digits"}]
    with pytest.raises(SweepError) as err:
        expand(_parse(data, tmp_path))
    assert "1-channel images but model 'resnet20_cifar' expects 3" in str(err.value)
    assert "nowhere.safetensors does not exist" in str(err.value)


def test_method_kinds_are_a_registry():
    assert "ptq" in METHODS
    params = METHODS.get("ptq").parse({"kind": "ptq", "calibrator": "kld", "bn_calib": True})
    assert params.display() == "kld+bn"
    fields = METHODS.get("ptq").config_fields(params)
    assert fields["w_observer"] == fields["a_observer"] == "kld" and "calibrator" not in fields


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    data = tiny_sweep(backends=["tensorrt"], methods=[{"calibrator": "mse", "calib_size": 32}], seeds=[3])
    job = expand(_parse(data, tmp_path)).jobs[0]
    first = execute(job, ContextCache())
    second = execute(job, ContextCache())  # fresh model, data and calibration
    assert first.status == second.status == "done", first.error
    timing = {"calib_seconds", "wall_seconds", "epoch_seconds_estimate", "fraction_of_epoch"}
    strip = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    assert strip(first.metrics) == strip(second.metrics)
    other_seed = expand(_parse({**data, "seeds": [4]}, tmp_path)).jobs[0]
    assert other_seed.run_id != job.run_id


AXES = ["models", "backends", "methods", "bits", "first_last", "residual", "skip", "seeds"]


@pytest.mark.fault(input="a sweep with an empty axis (`backends: []`, `bits: []`, ...)",
                   message="sweep.yaml is not a valid sweep: backends: List should have at least 1 item ...",
                   exit_code=2, kept="nothing is created (no store, no cards)")
@pytest.mark.parametrize("axis", AXES)
def test_an_empty_axis_is_refused_before_the_store_is_created(tmp_path, axis):
    from rich.console import Console

    from quantbench.cli.bench import run_sweep_file

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**tiny_sweep(), axis: []}))
    with pytest.raises(SweepError, match=rf"not a valid sweep:\n  {axis}: List should have at least 1 item"):
        run_sweep_file(path, tmp_path / "out", None, 1, "refuse", False, False, Console())
    assert not (tmp_path / "out").exists()
