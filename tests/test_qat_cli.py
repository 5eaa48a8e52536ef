"""``quantbench qat``: YAML + flags, the JSON keys, artefacts, and errors that name the problem; the recipe."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantbench.cli.main import app
from quantbench.ptq.pipeline import PTQResult
from quantbench.qat.config import load_qat_config
from quantbench.qat.recipe import build_optimizer, recipe_defaults

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_qat_from_yaml_with_flag_overrides_writes_ptq_keys_and_artefacts(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["qat", "--config", str(ROOT / "examples" / "qat_digits.yaml"), "--out-dir",
                              str(tmp_path / "run"), "--out", str(out), "--lr", "0.01", "--max-train", "256",
                              "--max-test", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert {f.name for f in fields(PTQResult)} - {"graph"} <= payload.keys()  # the graph is not JSON
    assert payload["layers"] and all(layer["w_bits"] == 4 for layer in payload["layers"][1:-1])
    assert payload["algorithm"] == "lsq" and payload["train_seconds"] > 0 and payload["backend"] == "tensorrt"
    assert payload["config"]["lr"] == 0.01 and payload["config"]["epochs"] == 1  # flag over YAML, YAML kept
    run = tmp_path / "run"
    for name in ("config.yaml", "log.jsonl", "checkpoint.pt", "final.pt", "quantizers.json", "curves.png",
                 "clipping_ranges.png"):
        assert (run / name).is_file(), name
    final = torch.load(run / "final.pt", weights_only=True)
    table = final["quantizers"]
    assert all("scale" in q and "zero_point" in q for q in table)
    assert {q["role"] for q in table} >= {"weight", "output"}
    assert load_qat_config(run / "config.yaml").lr == 0.01  # the saved config reloads


@pytest.mark.parametrize(("yaml_text", "flags", "needle"), [
    ("model: digits_cnn\nepochz: 3\n", [], "epochz"),
    ("model: digits_cnn\nepochs: 0\n", [], "epochs"),
    ("model: digits_cnn\nalgorithm: pact\nalgorithm_options: {alpha_init: -1}\n", [], "alpha_init"),
    ("model: digits_cnn\n", ["--algorithm", "apot", "--backend", "tensorrt"], "academic setting"),
    ("model: digits_cnn\n", ["--algorithm", "lsqq"], "unknown QAT algorithm 'lsqq'"),
    ("- just\n- a list\n", [], "must hold a mapping"),
])
def test_bad_input_is_named(tmp_path: Path, yaml_text: str, flags: list[str], needle: str) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    res = runner.invoke(app, ["qat", "--config", str(cfg), *flags])
    assert res.exit_code == 2
    assert needle in res.output, res.output


def test_family_defaults_and_a_separate_quantizer_group() -> None:
    assert recipe_defaults("resnet18").lr == 0.004 and recipe_defaults("resnet18").weight_decay == 1e-4
    assert recipe_defaults("mobilenet_v2").lr == 0.01 and recipe_defaults("mobilenet_v2").weight_decay == 1e-5
    cfg = load_qat_config(None, {"model": "mobilenet_v2", "quantizer_weight_decay": 8e-5})
    r = cfg.resolved()
    assert (r["lr"], r["weight_decay"], r["quantizer_weight_decay"]) == (0.01, 1e-5, 8e-5)
    net, q = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.ones(1))
    opt = build_optimizer(net, [q], 0.01, 1e-5, 0.01, 8e-5)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-5, 8e-5]
    assert opt.param_groups[0]["momentum"] == 0.9


# ------------------------------------------------------------------------------------------ run folders
DIGITS = ["qat", "--model", "digits_cnn", "--data", "digits", "--backend", "fbgemm", "--w-bits", "4", "--a-bits",
          "4", "--epochs", "1", "--batch-size", "64", "--max-train", "128", "--max-test", "32",
          "--quiet"]


@pytest.mark.fault(input="qat into an --out-dir holding an earlier run's checkpoint.pt, without --resume",
                   message="holds the checkpoint of an earlier run: pass --resume ..., --overwrite ... or another "
                           "--out-dir", exit_code=2, kept="the earlier checkpoint and log, byte for byte")
def test_a_folder_holding_a_checkpoint_is_refused_without_resume_or_overwrite(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"earlier run")
    (run / "log.jsonl").write_text('{"event": "epoch"}\n')
    res = runner.invoke(app, [*DIGITS, "--out-dir", str(run)])
    assert res.exit_code == 2, res.output
    assert "holds the checkpoint of an earlier run" in res.output and "--overwrite" in res.output
    assert (run / "checkpoint.pt").read_bytes() == b"earlier run"
    assert (run / "log.jsonl").read_text() == '{"event": "epoch"}\n'


@pytest.mark.fault(input="qat --resume with an --out-dir holding no checkpoint", exit_code=2,
                   message="--resume: OUT_DIR holds no checkpoint.pt to resume from", kept="nothing trained")
def test_resume_with_nothing_to_resume_says_so(tmp_path: Path) -> None:
    res = runner.invoke(app, [*DIGITS, "--out-dir", str(tmp_path / "empty"), "--resume"])
    assert res.exit_code == 2, res.output
    assert "holds no checkpoint.pt to resume from" in res.output
    assert not (tmp_path / "empty" / "log.jsonl").exists()


def test_overwrite_deletes_the_earlier_run_files_and_trains_anew(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) \
        -> None:
    def torn_write(self: Path, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"non-atomic write of {self}")  # every run file goes through utils/io.atomic_write

    monkeypatch.setattr(Path, "write_text", torn_write)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"earlier run")
    (run / "final.pt").write_bytes(b"earlier final")
    (run / "notes.txt").write_bytes(b"mine")
    res = runner.invoke(app, [*DIGITS, "--out-dir", str(run), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert torch.load(run / "final.pt", weights_only=True)["metrics"]["epochs"] == 1
    assert (run / "notes.txt").read_bytes() == b"mine"  # only the run's own files are removed


def test_default_run_folders_are_unique_per_run_identity(tmp_path: Path) -> None:
    base = {"model": "digits_cnn", "backend": "tensorrt", "w_bits": 4, "a_bits": 4, "algorithm": "lsq+"}
    a = load_qat_config(None, base).run_dir()
    assert a.parent == Path("qat-out") and a.name.startswith("digits_cnn-tensorrt-lsqplus-w4a4-")
    assert load_qat_config(None, base).run_dir() == a  # the same run: the same folder (so --resume finds it)
    assert load_qat_config(None, {**base, "max_test": 10}).run_dir() == a  # evaluation only: the same run
    assert load_qat_config(None, {**base, "lr": 0.5}).run_dir() != a
    assert load_qat_config(None, {**base, "seed": 1}).run_dir() != a
    assert load_qat_config(None, {**base, "out_dir": str(tmp_path)}).run_dir() == tmp_path


@pytest.mark.fault(input="qat --lr 10 on a trained digits CNN", exit_code=0, kept="the run and its result",
                   message="warning: the training loss is diverging: ... lower --lr (one line on stderr, also in "
                           "the result's extra.warnings)")
def test_a_diverging_run_warns_in_one_line(tmp_path: Path) -> None:
    from quantbench.sweep.weights import ensure_trained

    weights = ensure_trained("digits_cnn", "digits", tmp_path / "weights", False, epochs=3)
    out = tmp_path / "r.json"
    res = runner.invoke(app, [*DIGITS, "--weights", str(weights), "--lr", "10", "--log-every", "1", "--out-dir",
                              str(tmp_path / "run"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "warning: the training loss is diverging" in res.output and "lower --lr" in res.output
    assert "DivergenceWarning" not in res.output and "train.py" not in res.output  # not Python's warning form
    assert any("loss is diverging" in w for w in json.loads(out.read_text())["extra"]["warnings"])


def test_recipe_families_are_a_registry_open_for_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantbench.errors import ConfigError
    from quantbench.qat.recipe import RECIPE_FAMILIES, FamilyDefaults, register_family

    monkeypatch.setattr(RECIPE_FAMILIES, "_items", {k: v for k, v in RECIPE_FAMILIES._items.items() if k != "small"})
    with pytest.raises(ConfigError, match=r"family 'small', which has no QAT recipe defaults \(known families: "
                                          r"densenet, .*register_family\('small'\)"):
        recipe_defaults("digits_cnn")
    # explicit values need no family defaults
    r = load_qat_config(None, {"model": "digits_cnn", "lr": 0.1, "weight_decay": 0.0}).resolved()
    assert (r["lr"], r["weight_decay"]) == (0.1, 0.0)

    @register_family("small")
    def _small(model: str) -> FamilyDefaults:
        return FamilyDefaults(0.5, 1e-3)

    assert recipe_defaults("digits_cnn") == FamilyDefaults(0.5, 1e-3)
