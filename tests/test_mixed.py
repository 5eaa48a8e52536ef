"""Learned mixed precision (seed 004 App. A): bit rounding, the rule's grid, constraints, the analytic max-feature-map
allocation, and the allocation's round trip through `ptq --overrides`, `export` and `verify`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from quantbench.backends import load_backend
from quantbench.backends.overrides import LayerOverride
from quantbench.cli.main import app
from quantbench.errors import ConfigError
from quantbench.graph.quantize import list_quantizers, prepare
from quantbench.mixed.allocation import Allocation
from quantbench.mixed.budget import Budget, analytic_max_fmap
from quantbench.mixed.config import MixedConfig
from quantbench.mixed.pipeline import run_mixed
from quantbench.mixed.search import attach, repair
from quantbench.models import build_model
from quantbench.observers import build_observer
from quantbench.ptq.calibrate import calibrate
from quantbench.quant.bitwidth import grid_steps, qrange_at, rescale, round_to_allowed
from quantbench.quant.fake_quant import fake_quantize
from quantbench.quant.qparams import qparams_from_range
from quantbench.sweep.weights import ensure_trained
from tests.test_sweep_plugin import one_thread, tiny_sweep  # noqa: F401  (one_thread: autouse)

runner = CliRunner()


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.set_num_threads(1)
    return str(ensure_trained("digits_cnn", "digits", tmp_path_factory.mktemp("weights"), False, epochs=2))


# ------------------------------------------------------------------ numerics
def test_round_to_allowed_gives_members_exactly_and_passes_the_gradient_straight_through():
    b = torch.tensor([1.2, 2.9, 3.0, 5.5, 6.1, 7.9, 12.0], requires_grad=True)
    allowed = torch.tensor([2.0, 4.0, 8.0])
    r = round_to_allowed(b, allowed)
    assert r.tolist() == [2.0, 2.0, 2.0, 4.0, 8.0, 8.0, 8.0]  # 3.0 ties to the lower; 5.5 nearer to 4
    r.sum().backward()
    assert b.grad.tolist() == [1.0] * 7
    ints = round_to_allowed(torch.tensor([2.4, 2.6, 7.51]), torch.arange(2.0, 9.0))
    assert ints.tolist() == [2.0, 3.0, 8.0]


def test_rescale_is_exact_forward_and_has_the_derivative_of_range_over_grid_steps():
    b = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    s0 = torch.tensor(0.0731, dtype=torch.float64)
    s = rescale(s0, b)
    assert s.item() == s0.item()
    s.backward()
    # d/db [R / (2^b - 1)] with R = s0 (2^4 - 1), in float64 by hand
    expected = -s0.item() * math.log(2) * 2**4 / (2**4 - 1)
    assert b.grad.item() == pytest.approx(expected, rel=1e-12)
    assert grid_steps(torch.tensor(3.0), narrow=True).item() == 6.0
    assert qrange_at(3, True) == (-4, 3) and qrange_at(3, True, True) == (-3, 3) and qrange_at(3, False) == (0, 7)


def _digits_gm(weights: str | None = None, backend: str = "fbgemm"):
    torch.manual_seed(0)
    model = build_model("digits_cnn", weights)
    gm = prepare(model, load_backend(backend), torch.zeros(1, 1, 16, 16), "minmax", "minmax")
    calibrate(gm, [torch.randn(32, 1, 16, 16)], progress=False)
    return gm


@pytest.mark.parametrize("backend", ["fbgemm", "tensorrt"])
def test_the_rule_at_each_bit_width_equals_the_static_quantizer_calibrated_at_that_width(backend):
    """Weights: the calibrator's grid at the rounded bits; activations: range_qparams of the learned range at those
    bits -- both equal torch-kernel fake quantization with independently computed qparams."""
    gm = _digits_gm(backend=backend)
    layers = [n for n, _ in gm.named_modules() if n in ("conv1", "block.conv1", "fc")]
    acts = [q.name for q in list_quantizers(gm) if q.role != "weight"][:3]
    s = attach(gm, layers, acts, [2, 3, 4, 8], 8.0)
    x = torch.randn(4, 1, 16, 16)
    mods = dict(gm.named_modules())
    for b in (2, 3, 4, 8):
        for name, rule in s.w_rules.items():
            rule.set_bits(b)
            q = mods[name].weight_quantizer
            w = mods[name].folded_weight_bias()[0].detach()
            obs = build_observer("minmax", q.scheme.with_bits(b), is_weight=True)
            obs.observe(w)
            sc, zp, qmin, qmax = obs.calculate_qparams()
            ref = fake_quantize(w, sc, zp, qmin, qmax, 0)
            assert rule.rounded_bits() == b
            torch.testing.assert_close(rule(w), ref, atol=1e-6 * float(sc.max()), rtol=0)
        for rule in s.a_rules.values():
            rule.set_bits(b)
            qmin, qmax = qrange_at(b, rule.signed)
            sc, zp = qparams_from_range(rule.lo.detach(), rule.hi.detach(), qmin, qmax,
                                        load_backend(backend).activation.symmetric)
            ref = fake_quantize(x, sc, zp, qmin, qmax)
            torch.testing.assert_close(rule(x), ref, atol=1e-5 * float(sc), rtol=0)


def test_allowed_sets_are_respected_in_every_forward_and_gradients_reach_the_bits():
    gm = _digits_gm()
    layers = ["conv1", "block.conv1", "block.conv2", "fc"]
    acts = [q.name for q in list_quantizers(gm) if q.role != "weight"]
    s = attach(gm, layers, acts, [2, 4, 8], 6.3)
    seen = set()
    for r in s.rules():
        with torch.no_grad():
            r.log_bits.add_(torch.randn(()) * 0.5)
        r.clamp_()
    gm.train(False)
    out = gm(torch.randn(8, 1, 16, 16))
    out.square().mean().backward()
    for r in s.rules():
        b = r.bits().detach()
        assert float(b) == int(b) and int(b) in (2, 4, 8)
        seen.add(int(b))
        assert r.log_bits.grad is not None and torch.isfinite(r.log_bits.grad) and float(r.log_bits.grad) != 0.0
    assert len(seen) > 1  # the perturbation spread the bits over the set
    for r in s.a_rules.values():  # ranges learn too
        assert r.lo.grad is not None and r.hi.grad is not None and float(r.hi.grad.abs() + r.lo.grad.abs()) > 0


# ------------------------------------------------------------------ constraints
def test_budget_averages_are_size_weighted_and_the_hinge_is_zero_inside():
    b = Budget(("a", "b"), (100, 300), ("x", "y"), (10, 30), w_avg=4.0, a_avg=6.0)
    w = torch.tensor([8.0, 2.0])  # (800 + 600) / 400 = 3.5
    a = torch.tensor([8.0, 6.0])  # (80 + 180) / 40 = 6.5
    assert float(b.weighted(w, b.w_sizes)) == pytest.approx(3.5)
    assert float(b.penalty(w, a)) == pytest.approx(2.0 * 0.5)
    assert b.satisfied({"a": 8, "b": 2}, {"x": 8, "y": 4}) and not b.satisfied({"a": 8, "b": 2}, {"x": 8, "y": 6})
    m = Budget((), (), ("x", "y"), (10, 30), a_max_fmap_bytes=15.0)  # 120 bits
    assert float(m.penalty(None, torch.tensor([8.0, 4.0]))) == 0.0
    assert float(m.penalty(None, torch.tensor([8.0, 5.0]))) == pytest.approx(2.0 * (150 - 120) / 30)


def test_repair_meets_the_budget_when_no_step_did():
    b = Budget(("a", "b", "c"), (10, 1000, 50), (), (), w_avg=3.0)
    fixed = repair(Allocation({"a": 8, "b": 8, "c": 8}, {}), b, [2, 3, 4, 8], {"a", "b", "c"})
    sizes = dict(zip(b.w_names, b.w_sizes, strict=True))
    avg = sum(fixed.weights[k] * sizes[k] for k in sizes) / sum(sizes.values())  # recomputed independently
    assert avg <= 3.0 and set(fixed.weights.values()) <= {2, 3, 4, 8}


def test_repair_lowers_only_maps_above_a_feature_map_budget_and_never_fixed_ones():
    b = Budget((), (), ("big", "mid", "small", "fixed"), (1000, 600, 10, 400), a_max_fmap_bytes=500.0)  # 4000 bits
    out = repair(Allocation({}, {"big": 8, "mid": 8, "small": 8, "fixed": 8}), b, [2, 4, 8], {"big", "mid", "small"})
    assert out.activations == {"big": 4, "mid": 4, "small": 8, "fixed": 8}  # 4000, 2400, 80, 3200 bits
    with pytest.raises(ConfigError, match="cannot be met"):
        repair(Allocation({}, {"big": 8, "fixed": 8}), Budget((), (), ("big", "fixed"), (1000, 1000),
                                                            a_max_fmap_bytes=500.0), [2, 4, 8], {"big"})


@pytest.mark.parametrize("budget", [256.0, 333.0, 1024.0])
def test_analytic_max_fmap_fits_every_map_and_no_layer_can_rise(budget):
    sizes = {"stem": 1024, "a": 512, "b": 256, "c": 64, "head": 16}
    bits, capped = analytic_max_fmap(sizes, budget, list(range(2, 9)), {"head": 8})
    for k, e in sizes.items():
        assert bits[k] * e <= 8 * budget
        if k != "head" and bits[k] < 8:
            assert (bits[k] + 1) * e > 8 * budget  # one more bit would exceed M
    assert bits["head"] == 8 and all(bits[k] == 8 for k in capped)


def test_analytic_max_fmap_names_the_smallest_feasible_budget():
    with pytest.raises(ConfigError, match="smallest feasible budget is 512 bytes"):
        analytic_max_fmap({"stem": 2048, "b": 10}, 100.0, [2, 4, 8])


def test_config_refuses_missing_or_contradictory_constraints():
    with pytest.raises(ValueError, match="give a constraint"):
        MixedConfig(model="digits_cnn")
    with pytest.raises(ValueError, match="two kinds of activation constraint"):
        MixedConfig(model="digits_cnn", a_avg=4, a_max_fmap=100)
    with pytest.raises(ValueError, match="outside the allowed"):
        MixedConfig(model="digits_cnn", w_avg=1.5, allowed=[2, 4, 8])


def test_quantizer_overrides_set_one_activation_and_a_pattern_matching_none_is_refused():
    model = build_model("digits_cnn", None)
    gm = prepare(model, load_backend("fbgemm"), torch.zeros(1, 1, 16, 16),
                 overrides=[LayerOverride(match="quantizer:conv1_post", a_bits=3)])
    bits = {q.name: q.scheme.bits for q in list_quantizers(gm)}
    assert bits["conv1_post"] == 3 and bits["x_in"] == 8
    with pytest.raises(ConfigError, match=r"matches no activation quantizer; they are: .*conv1_post"):
        prepare(model, load_backend("fbgemm"), torch.zeros(1, 1, 16, 16),
                overrides=[LayerOverride(match="quantizer:nope*", a_bits=3)])
    with pytest.raises(ValueError, match="can set only a_bits"):
        LayerOverride(match="quantizer:conv1_post", w_bits=3)


# ------------------------------------------------------------------ end to end
def _independent_averages(result, budget_names):
    sizes = result.layer_sizes["weights"]
    w = result.allocation.weights
    return sum(w[n] * sizes[n] for n in budget_names) / sum(sizes[n] for n in budget_names)


def test_learned_allocation_meets_the_constraint_even_when_the_last_step_does_not(digits_weights):
    # 25 steps from 8 bits at lr 0.01 cannot reach 3 bits: no step meets it, so the allocation is repaired
    cfg = MixedConfig(model="digits_cnn", weights=digits_weights, data="digits", backend="fbgemm", w_avg=3.0,
                      steps=25, images=128, max_test=128, baselines=False)
    r = run_mixed(cfg, progress=False)
    names = list(r.allocation.weights)
    assert r.search is not None and r.search.repaired and r.averages["satisfied"]
    assert _independent_averages(r, names) <= 3.0 + 1e-9
    # and a run that starts low meets it during training and returns the best EMA step that did
    cfg2 = cfg.model_copy(update={"init_bits": 3.0, "steps": 30})
    r2 = run_mixed(cfg2, progress=False)
    assert not r2.search.repaired and r2.search.best_step is not None
    assert _independent_averages(r2, list(r2.allocation.weights)) <= 3.0 + 1e-9


def test_first_last_out_keeps_them_at_8_bits_and_out_of_the_average(digits_weights):
    cfg = MixedConfig(model="digits_cnn", weights=digits_weights, data="digits", backend="fbgemm", w_avg=3.0,
                      a_avg=4.0, first_last_budget="out", steps=20, images=64, max_test=64, baselines=False,
                      init_bits=3.0)
    r = run_mixed(cfg, progress=False)
    layers = {row["name"]: row for row in r.ptq.layers}
    assert layers["conv1"]["w_bits"] == 8 and layers["fc"]["w_bits"] == 8
    assert layers["conv1"]["a_bits"] == 8 and layers["fc"]["a_bits"] == 8
    assert r.constraint["weights_in_budget"] == len(layers) - 2
    inner = [n for n in r.allocation.weights if n not in ("conv1", "fc")]
    assert _independent_averages(r, inner) <= 3.0 + 1e-9 and r.averages["satisfied"]


def test_allocation_round_trips_through_ptq_overrides_export_and_verify(digits_weights, tmp_path: Path):
    own = tmp_path / "own.yaml"  # the user's own overrides are part of the saved file
    own.write_text("- {match: 'block.*', weight: {granularity: per_tensor}}\n")
    res = runner.invoke(app, ["mixed", "--model", "digits_cnn", "--weights", digits_weights, "--data", "digits",
                              "--w-avg", "4", "--a-avg", "6", "--allowed", "2,4,8", "--steps", "30", "--images",
                              "128", "--max-test", "256", "--quiet", "--overrides", str(own), "--out",
                              str(tmp_path / "m.json"),
                              "--save-overrides", str(tmp_path / "alloc.yaml"), "--card", str(tmp_path / "card.json")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert "--overrides " + str(tmp_path / "alloc.yaml") in (tmp_path / "alloc.yaml").read_text()
    assert "block.*" in (tmp_path / "alloc.yaml").read_text()
    assert set(m["allocation"]["weights"].values()) <= {2, 4, 8}
    assert set(m["allocation"]["activations"].values()) <= {2, 4, 8}
    card = json.loads((tmp_path / "card.json").read_text())
    mp = card["mixed_precision"]
    assert mp["mixed"] and mp["allowed_bitwidths"] == {"weights": [2, 4, 8], "activations": [2, 4, 8]}
    assert mp["search"]["first_last"] == "in" and mp["search"]["labels"] == "true"
    assert card["resource_complexity"]["labels_used"] is True
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--weights", digits_weights, "--data", "digits",
                              "--backend", "fbgemm", "--w-observer", "minmax", "--a-observer", "minmax",
                              "--overrides", str(tmp_path / "alloc.yaml"), "--max-test", "256", "--quiet",
                              "--out", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    p = json.loads((tmp_path / "p.json").read_text())
    assert p["quant_top1"] == m["quant_top1"] and p["agreement"] == m["agreement"]
    onnx = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "--model", "digits_cnn", "--weights", digits_weights, "--data", "digits",
                              "--backend", "fbgemm", "--w-observer", "minmax", "--a-observer", "minmax",
                              "--overrides", str(tmp_path / "alloc.yaml"), "--out", str(onnx), "--quiet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["verify", "--onnx", str(onnx), "--data", "digits", "--quiet", "--max-test", "256",
                              "--out", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["agreement"] == 1.0, v


def test_sweep_method_kind_mixed_runs_and_writes_a_mixed_card(tmp_path: Path):
    from quantbench.sweep.execute import execute
    from quantbench.sweep.expand import expand
    from quantbench.sweep.load import parse_sweep
    from quantbench.sweep.methods import ContextCache

    method = {"kind": "mixed", "w_avg": 4, "allowed": [2, 4, 8], "steps": 5, "images": 64, "calib_size": 32,
              "baselines": False}
    job = expand(parse_sweep(tiny_sweep(backends=["fbgemm"], methods=[method]), tmp_path)).jobs[0]
    assert job.method_label == "mixed:w4{2,4,8}"
    record = execute(job, ContextCache())
    assert record.status == "done", record.error
    assert record.metrics["avg_weight_bits"] <= 4.0 and record.metrics["constraint"]["allowed"] == [2, 4, 8]
    mp = record.card["mixed_precision"]
    assert mp["mixed"] and mp["allowed_bitwidths"]["weights"] == [2, 4, 8] and mp["search"]["steps"] == 5
    from quantbench.report.mixed import mixed_section
    from quantbench.store import RunRow

    html = mixed_section([RunRow(run_id="r", status="done", method_label=job.method_label, model="digits_cnn",
                                 backend="fbgemm", quant_top1=record.metrics["quant_top1"], metrics=record.metrics,
                                 card=record.card)])
    assert "Mixed precision" in html and html.count("data:image/png;base64,") == 1 and "any integer" not in html


def test_sweep_refuses_a_mixed_entry_without_a_constraint(tmp_path: Path):
    from quantbench.errors import SweepError
    from quantbench.sweep.expand import expand
    from quantbench.sweep.load import parse_sweep

    with pytest.raises(SweepError, match="give a constraint"):
        expand(parse_sweep(tiny_sweep(backends=["fbgemm"], methods=[{"kind": "mixed"}]), tmp_path))


@pytest.mark.fault(input="`mixed --allowed 2,four,8` (a bit-width that is not a number)",
                   message="--allowed takes comma-separated bit-widths such as 2,4,8 (or 'any'), got '2,four,8'",
                   exit_code=2, kept="nothing is computed")
def test_mixed_refuses_an_unreadable_allowed_set():
    res = runner.invoke(app, ["mixed", "--model", "digits_cnn", "--data", "digits", "--w-avg", "4",
                              "--allowed", "2,four,8", "--quiet"])
    assert res.exit_code == 2 and "--allowed takes comma-separated bit-widths" in res.output


@pytest.mark.fault(input="`mixed` with no --w-avg, --a-avg or --a-max-fmap",
                   message="give a constraint: w_avg (--w-avg), a_avg (--a-avg) or a_max_fmap (--a-max-fmap)",
                   exit_code=2, kept="nothing is computed")
def test_mixed_without_a_constraint_is_refused_before_any_work():
    res = runner.invoke(app, ["mixed", "--model", "digits_cnn", "--data", "digits", "--quiet"])
    assert res.exit_code == 2 and "give a constraint" in res.output


@pytest.mark.fault(input="`mixed --a-max-fmap 10` (below the smallest allowed bit-width on the largest map)",
                   message="--a-max-fmap 10 bytes is below 2 bits on x_in (...): the smallest feasible budget is "
                           "N bytes",
                   exit_code=2, kept="nothing is written")
def test_an_infeasible_feature_map_budget_names_the_smallest_feasible_one(digits_weights):
    res = runner.invoke(app, ["mixed", "--model", "digits_cnn", "--weights", digits_weights, "--data", "digits",
                              "--a-max-fmap", "10", "--max-test", "32", "--quiet"])
    assert res.exit_code == 2 and "smallest feasible budget" in res.output


def test_weights_learned_under_an_analytic_feature_map_budget(digits_weights):
    sizes = run_mixed(MixedConfig(model="digits_cnn", weights=digits_weights, data="digits", backend="fbgemm",
                                  a_max_fmap=1e9, max_test=32, baselines=False), progress=False
                      ).layer_sizes["activations"]
    budget = 4 * max(sizes.values()) / 8
    cfg = MixedConfig(model="digits_cnn", weights=digits_weights, data="digits", backend="fbgemm", w_avg=4.0,
                      a_max_fmap=budget, steps=10, images=64, max_test=64, init_bits=4.0)
    r = run_mixed(cfg, progress=False)
    assert r.averages["satisfied"] and r.averages["avg_weight_bits"] <= 4.0
    assert all(r.allocation.activations[q] * e <= 8 * budget for q, e in sizes.items())
    assert set(r.baselines) == {"uniform", "greedy"}


def test_learned_feature_map_mode_refuses_an_infeasible_budget_before_searching(digits_weights):
    cfg = MixedConfig(model="digits_cnn", weights=digits_weights, data="digits", backend="fbgemm", a_max_fmap=10.0,
                      fmap_mode="learned", steps=10, images=64, max_test=32)
    with pytest.raises(ConfigError, match="smallest feasible budget"):
        run_mixed(cfg, progress=False)
    with pytest.raises(ValueError, match="fmap_mode learned needs a feature-map budget"):
        MixedConfig(model="digits_cnn", w_avg=4, fmap_mode="learned")


def test_analytic_max_fmap_run_fits_the_budget_and_reports_uniform_beside_it(digits_weights):
    probe = MixedConfig(model="digits_cnn", weights=digits_weights, data="digits", backend="fbgemm",
                        a_max_fmap=1e9, max_test=64, baselines=False)
    sizes = run_mixed(probe, progress=False).layer_sizes["activations"]
    budget = 4 * max(sizes.values()) / 8  # uniform A4's largest feature map
    cfg = probe.model_copy(update={"a_max_fmap": budget, "baselines": True})
    r = run_mixed(cfg, progress=False)
    assert r.search is None and r.constraint["kind"] == "max_fmap_analytic"
    acts = r.allocation.activations
    assert all(acts[q] * e <= 8 * budget for q, e in sizes.items())
    assert max(acts.values()) > 4  # smaller maps get more bits than uniform A4
    uni = r.baselines["uniform"]
    vals = list(uni["allocation"]["activations"].values())
    assert vals.count(8) == 1 and set(vals) == {4, 8}  # A4 everywhere but the last layer's input (kept at 8)


def test_dither_estimator_adds_one_step_of_noise_with_gradients_and_rounds_when_evaluating():
    gm = _digits_gm()
    s = attach(gm, ["block.conv1"], [], [2, 3, 4, 8], 3.0, dither=True)
    rule = s.w_rules["block.conv1"]
    w = dict(gm.named_modules())["block.conv1"].folded_weight_bias()[0].detach()
    torch.manual_seed(0)
    noisy = rule(w)
    scale = rule.scale_table[1].reshape(-1, 1, 1, 1)  # the 3-bit grid
    off_grid = ((noisy.detach() / scale) - torch.round(noisy.detach() / scale)).abs()
    assert float(off_grid.max()) > 0.1  # not on the grid: noise, not rounding
    assert float((noisy.detach() - w).abs().div(scale).max()) <= 0.5 + 1e-5  # within half a step
    noisy.sum().backward()
    assert rule.log_bits.grad is not None and float(rule.log_bits.grad) != 0.0
    with torch.no_grad():
        rule.dither = True
        hard = rule(w)
    rule.dither = False
    with torch.no_grad():
        torch.testing.assert_close(hard, rule(w))
