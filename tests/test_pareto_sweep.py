"""Seed 003 as a sweep: ``train_qat`` runs (from scratch, checkpoint reused by identity), the ``pareto:`` section
(fronts across widths, the DualPrecision grid at matched C_size), the analysis and the report's Pareto section, and
``quantbench pareto`` end to end on a tiny digits sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantbench.cards import validate_card
from quantbench.cli.main import app
from quantbench.errors import SweepError
from quantbench.models import build_model
from quantbench.pareto.analysis import analyse, best_pairs
from quantbench.report.pareto import pareto_section
from quantbench.size import depthwise_layers, model_size
from quantbench.store import RunRow
from quantbench.sweep.execute import execute
from quantbench.sweep.expand import expand
from quantbench.sweep.load import parse_sweep
from quantbench.sweep.methods import ContextCache

runner = CliRunner()


def _sweep(tmp_path: Path, **over):
    data = {"name": "pareto-test", "models": [{"model": "digits_dwcnn", "weights": None, "data": "digits"}],
            "backends": ["academic"], "methods": [{"kind": "train_qat", "epochs": 2, "warmup_epochs": 1,
                                                     "max_train": 512, "calib_size": 64}],
            "bits": ["W1A4", "W8A4"], "settings": {"max_test": 128}, **over}
    return parse_sweep(data, tmp_path, "sweep.yaml")


def test_pareto_widths_run_every_model_and_precision_at_each_width(tmp_path):
    jobs = expand(_sweep(tmp_path, pareto={"widths": [0.5, 1, 2]})).jobs
    assert sorted((j.config["w_bits"], j.config["width_mult"]) for j in jobs) == [
        (b, w) for b in (1, 8) for w in (0.5, 1.0, 2.0)]
    assert all(j.config["pareto"] == {"role": "front"} for j in jobs)
    assert len({j.run_id for j in jobs}) == 6


def test_the_dual_precision_grid_matches_each_cells_c_size_to_the_reference(tmp_path):
    dp = {"bits": [1, 2, 4, 8], "reference": {"width": 0.5, "bits": 8}, "tolerance": 0.1}
    jobs = expand(_sweep(tmp_path, bits=["W4A4"], pareto={"dual_precision": dp})).jobs
    cells = [j for j in jobs if j.config["pareto"]["role"] == "dual"]
    assert sorted((j.config["pareto"]["depthwise_bits"], j.config["w_bits"]) for j in cells) == [
        (d, o) for d in (1, 2, 4, 8) for o in (1, 2, 4, 8)]
    ref = model_size(build_model("digits_dwcnn", None, 0.5), (1, 8, 8), w_bits=8, first_last_bits=8).c_size_bits
    for j in cells:  # an independent recount: the cell's model at its width with its per-layer bits
        p = j.config["pareto"]
        model = build_model("digits_dwcnn", None, j.config["width_mult"])
        dw = dict.fromkeys(depthwise_layers(model), p["depthwise_bits"])
        size = model_size(model, (1, 8, 8), w_bits=j.config["w_bits"], first_last_bits=8, layer_bits=dw).c_size_bits
        assert p["target_c_size_bits"] == ref and p["c_size_bits"] == size
        assert abs(size - ref) <= 0.1 * ref
        assert j.config["overrides"] == [{"match": "depthwise", "w_bits": p["depthwise_bits"]}]
    wider = {(j.config["pareto"]["depthwise_bits"], j.config["w_bits"]): j.config["width_mult"] for j in cells}
    assert wider[(8, 1)] > wider[(8, 8)] and wider[(1, 8)] > wider[(8, 8)]  # fewer bits buy width


def test_dual_precision_on_a_model_without_depthwise_convs_is_refused(tmp_path):
    sweep = _sweep(tmp_path, models=[{"model": "digits_cnn", "weights": None, "data": "digits"}],
                   pareto={"dual_precision": {"models": ["digits_cnn"]}})
    with pytest.raises(SweepError, match="digits_cnn' has no depthwise convs"):
        expand(sweep)


@pytest.mark.parametrize(("entry", "message"), [
    ({"kind": "train_qat", "epochs": 3}, "warmup_epochs 5 must be below epochs 3"),
    ({"kind": "train_qat", "epochs": 10, "algorithm": "nope"}, "nope"),
])
def test_train_qat_entries_are_validated_when_the_sweep_loads(tmp_path, entry, message):
    with pytest.raises(SweepError, match=message):
        _sweep(tmp_path, methods=[entry])


def test_train_qat_trains_from_scratch_and_reuses_its_checkpoint(tmp_path, torch_one_thread):
    method = {"kind": "train_qat", "epochs": 4, "warmup_epochs": 1, "calib_size": 64}
    job = expand(_sweep(tmp_path, bits=["W1A4"], methods=[method],
                        models=[{"model": "digits_cnn", "weights": None, "data": "digits"}])).jobs[0]
    job = job.with_config(run_dir=str(tmp_path / "ckpt" / job.run_id))
    first = execute(job, ContextCache())
    assert first.status == "done", first.error
    m = first.metrics
    assert m["quant_top1"] > 50.0 and not m["checkpoint_reused"]  # 4 epochs from scratch: far above chance (10 %)
    # C_size of the trained graph, recounted: 1-bit middle layers, 8-bit first / last layer
    assert m["c_size_bits"] == model_size(build_model("digits_cnn"), (1, 8, 8), w_bits=1,
                                          first_last_bits=8).c_size_bits
    validate_card(first.card)
    assert first.card["resource_complexity"]["training"]["from_scratch"] is True
    final = tmp_path / "ckpt" / job.run_id / "final.pt"
    stamp = final.stat().st_mtime_ns
    again = execute(job, ContextCache())
    assert again.metrics["checkpoint_reused"] and final.stat().st_mtime_ns == stamp
    assert again.metrics["quant_top1"] == m["quant_top1"] and again.metrics["c_size_bits"] == m["c_size_bits"]


def _row(run_id: str, w: int, width: float, size: float, top1: float, pareto: dict) -> RunRow:
    return RunRow(run_id, "done", model="m", data="d", backend="academic", method_label="gaussian:2ep", w_bits=w,
                  a_bits=4, quant_top1=top1, config={"width_mult": width, "pareto": pareto},
                  metrics={"c_size_bits": size})


def test_the_analysis_draws_fronts_gives_verdicts_and_picks_the_best_pair():
    rows = [_row("a1", 1, 1, 100, 60, {"role": "front"}), _row("a2", 1, 2, 400, 80, {"role": "front"}),
            _row("b1", 8, 0.5, 200, 50, {"role": "front"}), _row("b2", 8, 1, 800, 70, {"role": "front"})]
    grid = {(1, 1): 40.0, (1, 8): 55.0, (8, 1): 61.0, (8, 8): 50.0}
    rows += [_row(f"g{d}{o}", o, 1, 300, acc, {"role": "dual", "depthwise_bits": d, "other_bits": o,
                                               "target_c_size_bits": 300}) for (d, o), acc in grid.items()]
    (a,) = analyse(rows)
    assert [f.name for f in a.fronts] == ["W1", "W8"]
    assert a.verdicts[0].winner == "a" and "W1 dominates W8" in a.verdicts[0].sentence()
    assert best_pairs([a]) == {("m", "gaussian:2ep"): (8, 1)}
    html = pareto_section(rows)
    assert "W1 dominates W8" in html and "DualPrecision grid" in html and "depthwise convs at 8 bits" in html
    assert pareto_section([_row("x", 8, 1, 1, 1, {})]) == ""  # no pareto role: no section


def test_quantbench_pareto_runs_the_grid_then_the_best_pair_across_widths(tmp_path, torch_one_thread):
    sweep = {"name": "pareto-cli", "models": [{"model": "digits_dwcnn", "weights": None, "data": "digits"}],
             "backends": ["academic"], "methods": [{"kind": "train_qat", "epochs": 2, "warmup_epochs": 1,
                                                      "max_train": 256, "calib_size": 32}],
             "bits": ["W2A4"], "settings": {"max_test": 64},
             "pareto": {"widths": [0.5, 1], "dual_precision": {"bits": [2, 8], "reference": {"width": 0.5},
                                                               "tolerance": 0.15, "widths": [0.5]}}}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(sweep))
    out = tmp_path / "out"
    res = runner.invoke(app, ["pareto", str(path), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    (summary,) = json.loads((out / "pareto.json").read_text())
    assert len(summary["grid"]) == 4 and summary["best_pair"] is not None
    pair = summary["best_pair"]
    assert f"DP dw{pair['depthwise_bits']}/w{pair['other_bits']}" in summary["fronts"]
    assert len(summary["fronts"]["W2"]) == 2
    html = (out / "report.html").read_text()
    assert 'id="pareto"' in html and "DualPrecision grid" in html
    again = runner.invoke(app, ["pareto", str(path), "--out", str(out), "--quiet"])
    assert again.exit_code == 0 and "0 to run" in " ".join(again.output.split()), again.output
