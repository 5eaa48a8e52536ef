"""CoQuant in sweeps and in ``quantbench ptq --from``: one training shared by a row per evaluated bit-width (one
folder, trained once, reused by identity), a card per row saying what B was and whether the bit-width is zero-shot,
impossible rows refused at load; evaluating a finished run at a bit-width it never saw gives what the run's own
evaluation gives when that bit-width is in its list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantbench.cards import validate_card
from quantbench.cli.main import app
from quantbench.coquant.config import CoQuantConfig
from quantbench.coquant.evaluate import evaluate_run
from quantbench.coquant.pipeline import run_coquant
from quantbench.errors import SweepError
from quantbench.sweep.execute import execute
from quantbench.sweep.expand import expand
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.methods import ContextCache
from quantbench.sweep.prepare import assign_run_dirs
from quantbench.sweep.weights import ensure_trained

runner = CliRunner()
METHOD = {"kind": "coquant", "trained_bits": [8, 2], "epochs": 1, "max_train": 256, "bn_calib_size": 64,
          "calib_size": 64}


def _said(output: str) -> str:
    """The CLI's message without rich's box and line breaks."""
    return " ".join(output.replace("│", " ").split())


def _sweep(tmp_path: Path, weights: Path, **over):
    data = {"name": "coquant-test", "models": [{"model": "digits_cnn", "weights": str(weights), "data": "digits"}],
            "backends": ["academic"], "methods": [METHOD], "bits": ["W8A8", "W5A5", "W2A2"],
            "settings": {"max_test": 128}, **over}
    return parse_sweep(data, tmp_path, "sweep.yaml")


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return ensure_trained("digits_cnn", "digits", tmp_path_factory.mktemp("cache"), progress=False)


def test_one_training_gives_a_stored_row_per_evaluated_bit_width(tmp_path, weights, torch_one_thread):
    jobs = assign_run_dirs(expand(_sweep(tmp_path, weights)).jobs, tmp_path / "checkpoints")
    assert len({j.run_id for j in jobs}) == 3
    assert len({j.config["run_dir"] for j in jobs}) == 1  # the rows share one training by identity
    records = {j.config["w_bits"]: execute(j, ContextCache()) for j in jobs}
    assert all(r.status == "done" for r in records.values()), [r.error for r in records.values()]
    run_dir = Path(jobs[0].config["run_dir"])
    trained = json.loads((run_dir / "result.json").read_text())
    own = {e["bits"]: e for e in trained["results"]}
    for b, rec in records.items():
        m = rec.metrics
        assert m["zero_shot"] is (b == 5) and m["trained_bits"] == [8, 2]
        assert m["bn_calib_images"] == (64 if b == 5 else 0)
        assert m["quant_top1"] == pytest.approx(own[b]["quant_top1"], abs=1e-9)  # the run's own evaluation
        validate_card(rec.card)
        facts = rec.card["resource_complexity"]["coquant"]
        assert facts["evaluated_bits"] == b and facts["zero_shot"] is (b == 5)
        assert "zero_shot_ranges" in facts["interpretations"] and rec.card["run"]["w_bits"] == b
    assert [records[b].metrics["checkpoint_reused"] for b in (8, 5, 2)] == [False, True, True]
    assert records[8].metrics["model_size_bytes"] > records[5].metrics["model_size_bytes"] > \
        records[2].metrics["model_size_bytes"]  # the frozen network's weights at each bit-width


def test_coquant_rows_that_cannot_run_are_refused_when_the_sweep_loads(tmp_path, weights):
    with pytest.raises(SweepError, match="one bit-width: give W8A8 or W4A4 instead of W8A4"):
        expand(_sweep(tmp_path, weights, bits=["W8A4"]))
    with pytest.raises(SweepError, match="BN stays unfolded"):
        expand(_sweep(tmp_path, weights, backends=["tensorrt"]))
    with pytest.raises(SweepError, match=r"2\.\.8"):
        _sweep(tmp_path, weights, methods=[{**METHOD, "trained_bits": [8, 1]}])


def test_ptq_from_a_run_at_an_unseen_bit_width_matches_the_runs_own_evaluation(tmp_path, weights,
                                                                                torch_one_thread):
    base = {"model": "digits_cnn", "weights": str(weights), "data": "digits", "bits": [8, 2], "epochs": 1,
            "max_train": 256, "bn_calib_size": 64, "calib_size": 64}
    short = run_coquant(CoQuantConfig(**base, eval_bits=[8, 2], out_dir=str(tmp_path / "a")), progress=False)
    full = run_coquant(CoQuantConfig(**base, eval_bits=[8, 6, 2], out_dir=str(tmp_path / "b")), progress=False)
    assert short.at(8).quant_top1 == full.at(8).quant_top1  # the same training
    out = tmp_path / "six.json"
    res = runner.invoke(app, ["ptq", "--from", str(tmp_path / "a"), "--bits", "6", "--out", str(out),
                              "--card", str(tmp_path / "six.md"), "--quiet"])
    assert res.exit_code == 0, res.output
    six = json.loads(out.read_text())
    assert six["zero_shot"] and six["bn_calib_images"] == 64 and six["w_bits"] == 6
    assert six["quant_top1"] == pytest.approx(full.at(6).quant_top1, abs=1e-9)
    assert six["agreement"] == pytest.approx(full.at(6).agreement, abs=1e-9)
    assert "evaluated at 6 bits (zero-shot" in (tmp_path / "six.md").read_text()
    assert evaluate_run(tmp_path / "b", 6).result.quant_top1 == pytest.approx(full.at(6).quant_top1, abs=1e-9)
    bad = runner.invoke(app, ["ptq", "--from", str(tmp_path / "a"), "--bits", "6", "--model", "digits_cnn"])
    assert bad.exit_code == 2 and "leave out --model" in _said(bad.output)
    bad = runner.invoke(app, ["ptq", "--from", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "--from and --bits go together" in _said(bad.output)
    bad = runner.invoke(app, ["ptq", "--from", str(tmp_path), "--bits", "6"])
    assert bad.exit_code == 2 and "not a finished `quantbench coquant` run" in _said(bad.output)


def test_the_report_plots_each_trained_network_across_bit_widths():
    from quantbench.report.coquant import coquant_groups, coquant_section
    from quantbench.store import RunRow

    def row(run_id: str, bits: int, top1: float, zero: bool, method: str = "coquant") -> RunRow:
        return RunRow(run_id, "done", method=method, method_label="coquant{8,2}:1ep", model="m", backend="academic",
                      w_bits=bits, a_bits=bits, fp_top1=90.0, quant_top1=top1, agreement=0.9,
                      metrics={"trained_bits": [8, 2], "zero_shot": zero, "bn_calib_images": 64 if zero else 0})

    rows = [row("a", 2, 60.0, False), row("b", 8, 89.0, False), row("c", 5, 85.0, True),
            row("d", 4, 80.0, False, method="ptq")]
    (runs,) = coquant_groups(rows).values()
    assert [r.w_bits for r in runs] == [8, 5, 2]  # the PTQ row is not part of it
    html = coquant_section(rows)
    assert "data:image/png;base64," in html and html.count("<tr>") == 4  # header + 3 bit-widths
    assert "zero-shot</td><td class=\"num\">64" in html
    assert coquant_section([rows[-1]]) == ""


def _ddp_worker(rank: int, world: int, port: int, cfg_json: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        run_coquant(CoQuantConfig.model_validate_json(cfg_json), progress=False)
    finally:
        dist.destroy_process_group()


def test_coquant_trains_under_ddp_with_several_forwards_per_step(tmp_path, weights):
    """DDP wraps the whole multi-precision loss (one DDP forward per step, unused parameters allowed: Swap leaves
    a block's BN of the student unused); wrapping the network alone failed on the second forward."""
    from tests.test_qat_train import spawn_two

    cfg = CoQuantConfig(model="digits_cnn", weights=str(weights), data="digits", bits=[8, 2], eval_bits=[8, 2],
                        epochs=1, max_train=256, calib_size=64, bn_calib_size=64, out_dir=str(tmp_path / "ddp"))
    spawn_two(_ddp_worker, cfg.model_dump_json())
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert [e["bits"] for e in result["results"]] == [8, 2]
    assert result["results"][0]["quant_top1"] > 80  # a pretrained digits CNN fine-tuned at 8 bits stays high
