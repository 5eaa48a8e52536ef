"""CoQuant (seed 002): one network over a bit-width set B. With B = {b} the loss is plain PACT QAT at b; teachers are
higher precisions (lambda = 0: the most confident); Swap with keep-probability 1 / 0 is the student / the teacher
bit for bit and p follows its schedule; switchable BN updates only the bit-width that ran; an unseen bit-width gets a
calibrated BN without touching the trained ones; a network frozen at one bit-width computes what the switched one
does there; the pipeline trains and evaluates every bit-width, zero-shot ones after BN calibration."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from quantbench.backends import load_backend
from quantbench.cli.main import app
from quantbench.coquant.config import CoQuantConfig
from quantbench.coquant.loss import CoQuantLoss
from quantbench.coquant.swap import block_probabilities, p1_at, swap_bits
from quantbench.coquant.switch import MultiBitRule, SwitchableBatchNorm, add_bits, freeze_at, make_switchable
from quantbench.coquant.teacher import select_teacher
from quantbench.errors import ConfigError, QuantbenchError
from quantbench.graph.quantize import all_quantizers, prepare
from quantbench.models import build_model, load_weights
from quantbench.ptq import calibrate
from quantbench.qat.prepare import prepare_qat
from quantbench.qat.quantizers import ALGORITHMS
from quantbench.qat.recipe import multistep_schedule

GEN = torch.Generator().manual_seed(0)
X = torch.randn(48, 1, 8, 8, generator=GEN)
Y = torch.randint(0, 10, (48,), generator=GEN)
runner = CliRunner()


@cache
def _float_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("digits_cnn").train()
    with torch.no_grad():  # running statistics that describe the network, so calibration sees real ranges
        for _ in range(4):
            model(torch.randn(32, 1, 8, 8, generator=GEN))
    return model.eval()


def _pact_graph(bits: int):
    spec = load_backend("academic").configure(w_bits=bits, a_bits=bits)
    gm = prepare(_float_model(), spec, X[:1], "minmax", "minmax")
    calibrate(gm, [(X, None)], progress=False)
    return prepare_qat(gm, "pact", 0)


def _switched(bits: tuple[int, ...] = (8, 4, 2)):
    alg = ALGORITHMS.get("pact")
    opts = alg.parse_options({})
    gm = _pact_graph(max(bits))
    return gm, make_switchable(gm, bits, lambda _r: (lambda ctx: alg.build(ctx, opts)), opts)


@pytest.mark.parametrize("bits", [4, 2])
def test_with_one_bit_width_the_loss_and_gradients_are_plain_pact_qat(bits):
    plain = _pact_graph(bits).train()
    gm, sw = _switched((bits,))
    gm.train()
    loss, _ = CoQuantLoss(sw)(gm, X, Y)
    ref = F.cross_entropy(plain(X), Y)
    assert torch.equal(loss, ref)
    loss.backward()
    ref.backward()
    grads = {n: p.grad for n, p in plain.named_parameters()}
    for name, p in gm.named_parameters():  # switched parameters live one level deeper, at rules.<bits> / bns.<bits>
        plain_name = name.replace(f".rules.{bits}", "").replace(f".bns.{bits}", "")
        assert torch.equal(p.grad, grads[plain_name]), name


def test_teachers_are_higher_precisions_and_lambda_zero_picks_the_most_confident():
    conf = {8: 0.7, 6: 0.9, 4: 0.8}
    dist = {8: 10.0, 6: 500.0, 4: 1.0}
    assert select_teacher(2, [8, 6, 4], conf, dist, 0.0) == 6
    assert select_teacher(2, [8, 6, 4], conf, dist, 0.001) == 4  # 0.9 - 0.5 < 0.8 - 0.001
    assert select_teacher(4, [8, 6, 4, 2], conf | {2: 1.0}, dist | {2: 0.0}, 0.0) == 6  # only above 4
    with pytest.raises(ValueError, match="no precision above 8"):
        select_teacher(8, [8], conf, dist, 0.0)
    gm, sw = _switched()
    gm.train()
    loss = CoQuantLoss(sw)
    loss(gm, X, Y)
    assert set(loss.last_teachers) == {4, 2} and all(t > b for b, t in loss.last_teachers.items())


def test_swap_keeps_the_student_at_p_one_and_the_teacher_at_p_zero_bit_for_bit():
    gm, sw = _switched()
    gm.eval()
    n = sw.state.n_blocks
    with torch.no_grad():
        with sw.state.at(2):
            student = gm(X)
        with sw.state.at(8):
            teacher = gm(X)
        with sw.state.at(swap_bits(2, 8, torch.ones(n)), student=2):
            assert torch.equal(gm(X), student)
        with sw.state.at(swap_bits(2, 8, torch.zeros(n)), student=2):
            assert torch.equal(gm(X), teacher)
        assert not torch.equal(student, teacher)
    probs = block_probabilities(0.9, 5)
    torch.testing.assert_close(probs, torch.tensor([0.9, 0.925, 0.95, 0.975, 1.0], dtype=torch.float64))
    assert p1_at(0.9, 0.0) == 0.9 and p1_at(0.9, 0.5) == pytest.approx(0.95) and p1_at(0.9, 1.0) == 1.0
    draws = torch.tensor([swap_bits(2, 8, probs, GEN) for _ in range(4000)])
    torch.testing.assert_close((draws == 2).double().mean(0), probs, atol=0.02, rtol=0)


def test_a_forward_at_b_updates_only_bs_batchnorm_and_an_unseen_bit_gets_its_own():
    gm, sw = _switched()
    sbn = next(iter(sw.bns.values()))
    before = {b: sbn.at(b).running_mean.clone() for b in (8, 4, 2)}
    gm.train()
    with torch.no_grad(), sw.state.at(4):
        gm(X)
    assert not torch.equal(sbn.at(4).running_mean, before[4])
    assert torch.equal(sbn.at(8).running_mean, before[8]) and torch.equal(sbn.at(2).running_mean, before[2])
    trained = {b: {k: v.clone() for k, v in sbn.at(b).state_dict().items()} for b in (8, 4, 2)}
    n = add_bits(gm, sw, 6, [(X[:32], None), (X[32:], None)])
    assert n == 48 and sbn.bits == (2, 4, 6, 8) and all(6 in r.bits for r in sw.rules.values())
    six = sbn.at(6)
    assert int(six.num_batches_tracked) == 2 and not torch.equal(six.running_mean, torch.zeros_like(six.running_mean))
    for b in (8, 4, 2):
        assert all(torch.equal(v, trained[b][k]) for k, v in sbn.at(b).state_dict().items())
    with pytest.raises(ConfigError, match="already runs at 6 bits"):
        add_bits(gm, sw, 6, [(X, None)])


def test_swapped_in_teacher_blocks_do_not_update_their_statistics():
    gm, sw = _switched()
    gm.train()
    stats = {name: sbn.at(8).running_mean.clone() for name, sbn in sw.bns.items()}
    with torch.no_grad(), sw.state.at([8] * sw.state.n_blocks, student=2):
        gm(X)
    assert all(torch.equal(sw.bns[n].at(8).running_mean, v) for n, v in stats.items())


def test_a_network_frozen_at_one_bit_width_computes_what_the_switched_one_does():
    gm, sw = _switched()
    gm.eval()
    for b in (8, 4, 2):
        frozen = freeze_at(gm, b).eval()
        assert not any(isinstance(m, (MultiBitRule, SwitchableBatchNorm)) for m in frozen.modules())
        with torch.no_grad(), sw.state.at(b):
            assert torch.equal(frozen(X), gm(X))


def test_the_config_refuses_bn_folding_backends_and_bad_bits():
    with pytest.raises(ConfigError, match="BN stays unfolded"):
        CoQuantConfig(model="digits_cnn", backend="tensorrt").check()
    with pytest.raises(ValueError, match=r"2\.\.8"):
        CoQuantConfig(model="digits_cnn", bits=[8, 1])
    with pytest.raises(ValueError, match="not w_bits"):
        CoQuantConfig(model="digits_cnn", w_bits=4)
    assert CoQuantConfig(model="digits_cnn", bits=[2, 8, 4]).evaluated_bits() == [8, 7, 6, 5, 4, 3, 2]


def test_multistep_schedule_multiplies_the_rate_at_each_milestone():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = multistep_schedule(opt, [3, 5], 0.1, warmup_steps=2)
    rates = []
    for _ in range(7):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_quantbench_coquant_trains_and_evaluates_every_bit_width(tmp_path, torch_one_thread):
    from quantbench.sweep.weights import ensure_trained

    weights = ensure_trained("digits_cnn", "digits", tmp_path / "cache", progress=False)
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["coquant", "--model", "digits_cnn", "--weights", str(weights), "--data", "digits",
                              "--bits", "8,4,2", "--eval-bits", "8,6,4,2", "--epochs", "1", "--max-train", "512",
                              "--ramp-epochs", "0.5",
                              "--bn-calib-size", "64", "--out-dir", str(tmp_path / "run"), "--out", str(out),
                              "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert [e["bits"] for e in r["results"]] == [8, 6, 4, 2]
    six = r["results"][1]
    assert six["zero_shot"] and six["bn_calib_images"] == 64
    assert not any(e["zero_shot"] for e in r["results"] if e["bits"] != 6)
    assert all(e["quant_top1"] > 80 for e in r["results"][:3]), r["results"]  # digits: a trained CNN stays high
    assert r["trained_bits"] == [8, 4, 2] and "teacher_score" in r["interpretations"]
    assert r["config"]["ramp_epochs"] == 0.5
    assert (Path(r["out_dir"]) / "final.pt").is_file()


def test_a_coquant_run_reloads_at_any_evaluated_bit_width_and_its_export_says_why_not(tmp_path, torch_one_thread):
    from quantbench.coquant.load import load_coquant_at
    from quantbench.data import load_data, make_loader
    from quantbench.models import get_entry
    from quantbench.ptq import predict
    from quantbench.sweep.weights import ensure_trained

    weights = ensure_trained("digits_cnn", "digits", tmp_path / "cache", progress=False)
    run = tmp_path / "run"
    res = runner.invoke(app, ["coquant", "--model", "digits_cnn", "--weights", str(weights), "--data", "digits",
                              "--bits", "8,2", "--eval-bits", "8,5,2", "--epochs", "1", "--max-train", "256",
                              "--bn-calib-size", "64", "--out-dir", str(run), "--quiet"])
    assert res.exit_code == 0, res.output
    result = json.loads((run / "result.json").read_text())
    entry = get_entry("digits_cnn")
    bundle = load_data("digits", entry.mean, entry.std, entry.input_size)
    loader = make_loader(bundle.test, 512)
    labels = torch.cat([y for _, y in loader])
    for e in result["results"]:  # the reloaded network at 8, 5 (zero-shot) and 2 bits: the same accuracy
        gm, config = load_coquant_at(run, e["bits"])
        top1 = 100.0 * float((predict(gm, loader, "cpu", False)[0] == labels).float().mean())
        assert top1 == pytest.approx(e["quant_top1"], abs=1e-6), e
        assert config["coquant"]["bits"] == e["bits"]
    with pytest.raises(ConfigError, match=r"give --bits, one of \[8, 5, 2\]"):
        load_coquant_at(run, 4)
    for bits in ("8", "5", "2", "6"):  # trained, zero-shot, the lowest, one never evaluated: refused, saying why
        exp = runner.invoke(app, ["export", "--from", str(run), "--bits", bits, "--out", str(tmp_path / "m.onnx")])
        assert exp.exit_code == 2 and "CoQuant run trained in the 'academic' setting" in " ".join(exp.output.split())
        assert not (tmp_path / "m.onnx").exists()


def test_bn_init_re_estimates_the_statistics_the_quantized_network_produces(tmp_path):
    from quantbench.qat.config import QATConfig
    from quantbench.qat.distributed import init_distributed
    from quantbench.qat.pipeline import prepare_run
    from quantbench.sweep.weights import ensure_trained

    weights = ensure_trained("digits_cnn", "digits", tmp_path / "cache", progress=False)
    runs = {}
    for bn_init in (False, True):
        cfg = QATConfig(model="digits_cnn", weights=str(weights), data="digits", algorithm="pact", bn_fold=0,
                        bn_init=bn_init, calib_size=64, out_dir=str(tmp_path / str(bn_init)))
        runs[bn_init] = prepare_run(cfg, init_distributed("cpu"), progress=False)
    stale, fresh = (dict(runs[k].gm.named_modules())["bn2"] for k in (False, True))
    assert not torch.equal(stale.running_var, fresh.running_var)
    assert int(fresh.num_batches_tracked) == 1  # the 64 calibration images, one batch, cumulative average


def test_each_lower_bit_width_starts_from_a_calibration_at_that_bit_width(tmp_path):
    from quantbench.coquant.pipeline import calibrate_lower_bits, switch
    from quantbench.data import calibration_subset, load_data, make_loader
    from quantbench.models import get_entry
    from quantbench.qat.distributed import init_distributed
    from quantbench.qat.pipeline import prepare_run
    from quantbench.sweep.weights import ensure_trained

    weights = ensure_trained("digits_cnn", "digits", tmp_path / "cache", progress=False)
    cfg = CoQuantConfig(model="digits_cnn", weights=str(weights), data="digits", bits=[8, 2], calib_size=64,
                        out_dir=str(tmp_path / "run"))
    run = prepare_run(cfg, init_distributed("cpu"), progress=False)
    sw = switch(run, cfg)
    top = {n: r.at(8).alpha.clone() for n, r in sw.rules.items() if hasattr(r.at(8), "alpha")}
    entry = get_entry("digits_cnn")
    bundle = load_data("digits", entry.mean, entry.std, entry.input_size, augment=False)
    loader = make_loader(calibration_subset(bundle, 64, cfg.seed), 64)
    assert calibrate_lower_bits(cfg, run, sw, loader, 10) == 1
    model = load_weights(build_model("digits_cnn"), str(weights)).eval()
    ref = prepare(model, load_backend("academic").configure(w_bits=2, a_bits=2), X[:1], "mse", "mse")
    calibrate(ref, loader, progress=False)
    checked = 0
    for name, alpha in top.items():
        two = sw.rules[name].at(2).alpha
        q = next(q for q in all_quantizers(ref) if q.name == name)
        expected = (q.qmax - q.zero_point) * q.scale
        torch.testing.assert_close(two, expected.reshape(two.shape).float())
        assert not torch.equal(two, alpha)  # the 8-bit range is not the 2-bit one
        checked += 1
    assert checked == 3


def test_the_optional_ramp_scales_only_the_lower_precisions_losses():
    gm, sw = _switched()
    gm.train()
    full = CoQuantLoss(sw, lam=0.0, generator=torch.Generator().manual_seed(1))
    total_full, _ = full(gm, X, Y)
    for progress, factor in ((0.0, 0.0), (0.25, 0.5), (0.9, 1.0)):
        ramped = CoQuantLoss(sw, lam=0.0, ramp=0.5, progress=lambda p=progress: p,
                             generator=torch.Generator().manual_seed(1))
        total, _ = ramped(gm, X, Y)
        parts = ramped.last_losses  # unscaled, per precision
        expected = parts[8] + factor * (parts[4] + parts[2])
        torch.testing.assert_close(float(total.detach()), expected, rtol=1e-5, atol=1e-5)
        assert ramped.terms() == 1 + 2 * factor  # what the divergence monitor divides the summed loss by
    assert float(total_full.detach()) == pytest.approx(sum(full.last_losses.values()), rel=1e-5)


def test_an_unseen_bit_widths_clipping_values_start_between_its_trained_neighbours():
    from quantbench.coquant.switch import start_range

    gm, sw = _switched((8, 4, 2))
    acts = {n: r for n, r in sw.rules.items() if hasattr(r.at(8), "alpha")}
    assert acts
    for i, r in enumerate(acts.values()):  # distinct, known clipping values per trained bit-width
        for b, a in ((8, 6.0 + i), (4, 3.0 + i), (2, 1.0 + i)):
            r.at(b).alpha.data.fill_(a)
    for bits, expect in ((6, lambda i: 4.5 + i), (7, lambda i: 5.25 + i), (3, lambda i: 2.0 + i)):
        for i, r in enumerate(acts.values()):  # linear in bit-width: α_b = α_lo + (b - lo) / (hi - lo) (α_hi - α_lo)
            lo, hi = start_range(r, bits, sw.state.trained, "linear")
            assert float(hi.reshape(-1)[0]) == pytest.approx(expect(i))
            assert float(lo.reshape(-1)[0]) == 0.0  # unsigned (after ReLU)
            assert float(start_range(r, bits, sw.state.trained, "nearest")[1].reshape(-1)[0]) == pytest.approx(
                {6: 6.0, 7: 6.0, 3: 3.0}[bits] + i)  # the nearest trained one, the higher on a tie
    n = add_bits(gm, sw, 6, [(X[:32], None), (X[32:], None)])
    assert n == 48
    for i, r in enumerate(acts.values()):
        assert float(r.at(6).alpha.detach()) == pytest.approx(4.5 + i)
    _, sw2 = _switched((8, 4))
    r = next(r for r in sw2.rules.values() if hasattr(r.at(8), "alpha"))
    r.at(8).alpha.data.fill_(6.0)
    r.at(4).alpha.data.fill_(3.0)
    assert float(start_range(r, 2, sw2.state.trained, "linear")[1].reshape(-1)[0]) == 3.0  # outside B: nearest
    with pytest.raises(ConfigError, match="not one of linear, nearest"):
        start_range(r, 2, sw2.state.trained, "cubic")


def test_bn_calibration_images_are_augmented_like_training_and_repeat_with_the_seed(tmp_path):
    from quantbench.coquant.pipeline import bn_calibration_loader, calibrate_bits
    from quantbench.data import calibration_subset, load_data
    from quantbench.models import get_entry

    entry = get_entry("digits_cnn")
    bundle = load_data("digits", entry.mean, entry.std, entry.input_size, augment=True)
    plain = calibration_subset(bundle, 64, 1)
    shifted = calibration_subset(bundle, 64, 1, augment=True)
    x0 = torch.stack([plain[i][0] for i in range(64)])
    torch.manual_seed(0)
    x1 = torch.stack([shifted[i][0] for i in range(64)])
    assert not torch.equal(x0, x1) and [plain[i][1] for i in range(64)] == [shifted[i][1] for i in range(64)]
    fill = float(-torch.tensor(entry.mean)[0] / torch.tensor(entry.std)[0])
    moved = (x1 != x0).flatten(1).any(1)
    assert moved.any() and bool((x1 == fill).any())  # a 1-pixel shift brings in black padding
    stats = []
    for _ in range(2):  # the same seed: the same augmented images, the same calibrated statistics
        cfg = CoQuantConfig(model="digits_cnn", data="digits", bits=[8, 2], bn_calib_size=64, seed=3)
        gm, sw = _switched((8, 2))
        calibrate_bits(cfg, gm, sw, 5, bn_calibration_loader(cfg), "cpu")
        stats.append(torch.cat([sbn.at(5).running_mean for sbn in sw.bns.values()]))
    torch.testing.assert_close(stats[0], stats[1], rtol=0, atol=0)
    cfg = CoQuantConfig(model="digits_cnn", data="digits", bits=[8, 2], bn_calib_size=64, seed=3,
                        bn_calib_augment=False)
    gm, sw = _switched((8, 2))
    calibrate_bits(cfg, gm, sw, 5, bn_calibration_loader(cfg), "cpu")
    assert not torch.equal(stats[0], torch.cat([sbn.at(5).running_mean for sbn in sw.bns.values()]))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_centred_weights_are_adabits_modified_levels_against_a_float64_reference(bits):
    from quantbench.qat.quantizers.dorefa import DoReFaOptions, DoReFaWeight
    from quantbench.quant.learning import QuantizerContext

    scheme = load_backend("academic").configure(w_bits=bits, a_bits=8).weight
    qmin, qmax = scheme.qrange(signed=True)
    rule = DoReFaWeight(QuantizerContext(scheme, qmin, qmax, True, "w", False, 1),
                        DoReFaOptions(centred_weights=True))
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(bits), requires_grad=True)
    y = rule.quantize(w)
    w64 = w.detach().double()
    t = torch.tanh(w64)
    wn = t / t.abs().max()
    n = 2 ** bits  # AdaBits README: q = 2 (1/2^b)(clip(floor(2^b (w + 1) / 2), 0, 2^b - 1) + 1/2) - 1
    ref = 2 * (1 / n) * (torch.clamp(torch.floor(n * (wn + 1) / 2), 0, n - 1) + 0.5) - 1
    torch.testing.assert_close(y.detach().double(), ref * w64.abs().max(), rtol=1e-6, atol=1e-6)
    levels = torch.unique(torch.round(ref * 1e6))
    assert len(levels) <= n and not (levels == 0).any()  # no zero level
    y.sum().backward()  # straight through the rounding: the gradient of the normalisation alone
    w2 = w.detach().clone().requires_grad_(True)
    (torch.tanh(w2) / torch.tanh(w2).abs().max() * w.detach().abs().max()).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)
    assert rule.export_qparams() is None and "centred weight levels" in rule.grid_refusal()


def test_a_centred_weight_rule_refuses_to_bake_and_says_why():
    alg = ALGORITHMS.get("pact")
    gm = _pact_graph(4)
    q = next(q for q in all_quantizers(gm) if q.is_weight and q.rule is not None)
    q.rule = alg.build(q.rule.ctx, alg.parse_options({"centred_weights": True}))
    with pytest.raises(QuantbenchError, match=r"centred weight levels .* no integer grid"):
        q.bake()


def test_coquant_trains_with_centred_weights_and_checkpoints_their_range(tmp_path, torch_one_thread):
    from quantbench.coquant.pipeline import run_coquant
    from quantbench.sweep.weights import ensure_trained

    weights = ensure_trained("digits_cnn", "digits", tmp_path / "cache", progress=False)
    cfg = CoQuantConfig(model="digits_cnn", weights=str(weights), data="digits", bits=[8, 4], eval_bits=[8, 6, 4],
                        epochs=1, max_train=256, calib_size=64, bn_calib_size=64,
                        algorithm_options={"centred_weights": True}, out_dir=str(tmp_path / "run"))
    result = run_coquant(cfg, progress=False)  # the epoch checkpoint describes every quantizer
    assert [e.bits for e in result.results] == [8, 6, 4] and result.at(8).quant_top1 > 80
    from quantbench.coquant.load import load_coquant_at

    gm, _ = load_coquant_at(tmp_path / "run", 4)
    centred = [q.rule for q in all_quantizers(gm) if q.is_weight and q.rule is not None and q.rule.grid_refusal()]
    levels = sorted(r.qmax - r.qmin + 1 for r in centred)
    assert levels == [16, 16, 16, 256, 256]  # every weight centred: the switched ones at 4 bits, first / last at 8
    d = next(r for r in centred if r.qmax - r.qmin + 1 == 16).describe()
    assert d["clip_hi"][0] == pytest.approx(-d["clip_lo"][0]) and d["clip_hi"][0] > 0 and "scale" not in d
