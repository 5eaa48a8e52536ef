"""Data-free quantization: BN-statistics generators, the data-source spec, the cache, and every data-consuming
command on synthetic data."""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from quantbench.cli.main import app
from quantbench.config import PTQConfig
from quantbench.data.loaders import augment_batch
from quantbench.datafree import make_images, parse_data_source
from quantbench.datafree.bns import BNSHooks, NoBatchNormError, channel_stats, input_batch_loss
from quantbench.datafree.generators.base import Target, augmenter
from quantbench.datafree.generators.bns_ce import BNSCEOptions, total_variation_l1
from quantbench.errors import ConfigError
from quantbench.models import build_model, get_entry
from quantbench.ptq.pipeline import run_ptq

runner = CliRunner()
SIZE = (1, 8, 8)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(tmp_path / "cache"))
    torch.set_num_threads(1)


@cache
def _trained_like() -> nn.Module:
    """The digits CNN whose BN running statistics are exactly those of a data distribution (smoothed, normalised
    noise) as the model evaluates it: each BN in turn gets its input's mean and variance in eval mode, so the
    statistics are consistent, as a trained model's are."""
    torch.manual_seed(0)
    model = build_model("digits_cnn").eval()
    smooth = torch.nn.functional.avg_pool2d(torch.randn(512, 1, 10, 10), 3, stride=1)  # spatially correlated
    data = (smooth - smooth.mean()) / smooth.std()  # normalised like a model input: mean 0, std 1
    for bn in BNSHooks(model, "batch").bns:
        seen: list[torch.Tensor] = []
        handle = bn.register_forward_pre_hook(lambda _m, a, seen=seen: seen.append(a[0]))
        with torch.no_grad():
            model(data)
        handle.remove()
        mean, var = channel_stats(seen[0], per_image=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return model


def _make(spec: str, n: int = 16, seed: int = 0, **options):
    """Images for :func:`_trained_like`, whose statistics are those of unbounded normalised noise: no clamping
    unless asked (with clamp, the digits normalisation's pixel range)."""
    if spec.startswith("synthetic"):
        options = {"clamp": False, **options}
    e = get_entry("digits_cnn")
    return make_images(parse_data_source(spec), _trained_like(), SIZE, 10, n, seed, "cpu", False, options or None,
                       e.mean, e.std)


# ---------------------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize(("spec", "kind", "gen", "n"), [
    ("real", "real", None, None), ("noise", "noise", "noise", None), ("noise:64", "noise", "noise", 64),
    ("synthetic:zeroq", "synthetic", "zeroq", None), ("synthetic:bns-ce:128", "synthetic", "bns-ce", 128),
    ("synthetic:fdda:10", "synthetic", "fdda", 10),
])
def test_data_source_specs_parse(spec, kind, gen, n):
    s = parse_data_source(spec)
    assert (s.kind, s.generator, s.n) == (kind, gen, n)


@pytest.mark.fault(input="`--calib-data synthetic:zeroQ` (an unknown generator) or `synthetic` without one",
                   message="calib_data 'synthetic:zeroQ' is not a data source: use real, noise[:N] or "
                           "synthetic:GENERATOR[:N] with GENERATOR one of bns-ce, fdda, zeroq",
                   exit_code=2, kept="nothing is generated or computed")
@pytest.mark.parametrize("spec", ["synthetic", "synthetic:zeroQ", "synthetic:gan", "real:5", "imagenet", "noise:x"])
def test_bad_data_sources_name_the_valid_forms(spec):
    with pytest.raises(ConfigError, match="zeroq"):
        parse_data_source(spec)
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--calib-data", spec, "--quiet"])
    assert res.exit_code == 2 and "zeroq" in res.output


def test_synthetic_options_are_validated_with_the_config():
    with pytest.raises(ValueError, match="iteratons"):
        PTQConfig(model="digits_cnn", calib_data="synthetic:zeroq", synthetic_options={"iteratons": 3})
    with pytest.raises(ValueError, match="calib_data is real"):
        PTQConfig(model="digits_cnn", synthetic_options={"iterations": 3})


# ---------------------------------------------------------------------------------------------- generators
def test_zeroq_lowers_the_bns_loss_and_matches_the_bn_statistics():
    model = _trained_like()
    hooks = BNSHooks(model, "per_image")
    noise = torch.randn(16, *SIZE)
    with torch.no_grad(), hooks.active():
        hooks.reset()
        model(noise)
        before = float(hooks.loss())
    out = _make("synthetic:zeroq", iterations=300)
    assert out.loss_curve[-1] < out.loss_curve[0] / 4
    with torch.no_grad(), hooks.active():
        hooks.reset()
        model(out.images)
        after = float(hooks.loss())
    assert after < before / 4
    batch = BNSHooks(model, "batch")  # the batch's statistics at every BN input, against the stored ones
    with torch.no_grad(), batch.active():
        batch.reset()
        model(out.images)
    for bn, (mean, var) in zip(batch.bns, batch.stats, strict=True):  # tolerance: 0.25 of the stored std
        scale = torch.sqrt(bn.running_var + bn.eps)
        assert ((mean - bn.running_mean).abs() / scale).max() < 0.25
        assert ((torch.sqrt(var + bn.eps) - scale).abs() / scale).max() < 0.25
    # finite, and normalised like the model's inputs (channel mean ~0, std ~1 per image)
    assert torch.isfinite(out.images).all()
    m, v = channel_stats(out.images, per_image=True)
    assert m.abs().max() < 0.2 and (v.sqrt() - 1).abs().max() < 0.2


def test_bns_ce_targets_balanced_classes():
    # the class term alone: on this random-weight toy, the default image prior (set for CIFAR ResNets) outweighs
    # its weak cross-entropy gradient
    out = _make("synthetic:bns-ce", n=40, iterations=150, tv_l1_weight=0.0, input_weight=0.0)
    assert out.labels is not None and torch.bincount(out.labels, minlength=10).tolist() == [4] * 10
    with torch.no_grad():
        pred = _trained_like()(out.images).argmax(1)
    assert float((pred == out.labels).float().mean()) > 0.3  # > 3x chance on random weights: CE pulls to targets


def test_fdda_makes_class_batches_from_synthetic_centres():
    out = _make("synthetic:fdda", n=20, iterations=60, centre_images=4, centre_iterations=30)
    assert out.real_images == 0 and out.card()["data_free"] is True
    assert out.images.shape == (20, *SIZE) and torch.isfinite(out.images).all()
    assert torch.bincount(out.labels, minlength=10).tolist() == [2] * 10


def test_fdda_with_real_centres_is_marked_not_data_free():
    e = get_entry("digits_cnn")
    out = make_images(parse_data_source("synthetic:fdda"), _trained_like(), SIZE, 10, 10, 0, "cpu", False,
                      {"iterations": 20, "real_centres": "digits"}, e.mean, e.std)
    assert out.real_images == 10 and out.card()["data_free"] is False


@pytest.mark.parametrize("gen", ["zeroq", "bns-ce"])
def test_clamped_images_stay_in_the_valid_pixel_range_and_unclamped_ones_leave_it(gen):
    e = get_entry("digits_cnn")
    lo, hi = (0 - e.mean[0]) / e.std[0], (1 - e.mean[0]) / e.std[0]
    free = _make(f"synthetic:{gen}", n=8, iterations=40, lr=0.5)
    assert free.images.min() < lo - 0.1 or free.images.max() > hi + 0.1  # the bound has something to do
    held = _make(f"synthetic:{gen}", n=8, iterations=40, lr=0.5, clamp=True)
    assert held.identity != free.identity
    assert held.images.min() >= lo - 1e-6 and held.images.max() <= hi + 1e-6
    assert held.card()["pixel_range"] == [[round(lo, 4)], [round(hi, 4)]]


def test_clamping_without_the_input_normalisation_names_the_fix():
    with pytest.raises(ConfigError, match=r"input normalisation.*clamp: false"):
        make_images(parse_data_source("synthetic:zeroq"), _trained_like(), SIZE, 10, 4, 0, "cpu", False,
                    {"iterations": 1})


def test_noise_is_standard_gaussian_in_the_normalised_space():
    out = _make("noise:4096")
    assert out.images.shape == (4096, *SIZE)
    assert abs(float(out.images.mean())) < 0.02 and abs(float(out.images.std()) - 1) < 0.02


@pytest.mark.parametrize("gen", ["zeroq", "bns-ce"])
def test_same_seed_gives_bit_identical_images(gen, tmp_path, monkeypatch):
    a = _make(f"synthetic:{gen}", iterations=20)
    monkeypatch.setenv("QUANTBENCH_CACHE_DIR", str(tmp_path / "other"))  # no cache hit: generated again
    b = _make(f"synthetic:{gen}", iterations=20)
    assert not b.cached and torch.equal(a.images, b.images)
    c = _make(f"synthetic:{gen}", seed=1, iterations=20)
    assert not torch.equal(a.images, c.images)


def test_the_loss_sees_the_training_augmentation_of_the_batch():
    """bns-ce's augmenter is the data pipeline's pad-crop + flip with black padding (same draws for the same
    seed), and the gradient reaches every pixel as often as the crops use it."""
    e = get_entry("resnet20_cifar")
    target = Target(nn.Identity(), (3, 8, 8), 10, torch.device("cpu"), e.mean, e.std)
    black = (0 - torch.tensor(e.mean)) / torch.tensor(e.std)  # a black pixel, normalised (float32)
    aug = augmenter(target, BNSCEOptions(pad=2), seed=3)
    ref = torch.Generator().manual_seed(3 + 7919)
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    for _ in range(3):  # successive batches keep drawing from the one seeded stream
        got, want = aug(x), augment_batch(x_ref, 2, True, black, ref)
        assert torch.equal(got, want)
        got.pow(2).sum().backward()
        want.pow(2).sum().backward()
        assert torch.allclose(x.grad, x_ref.grad)
    assert (got == black.view(1, 3, 1, 1)).any()  # some padding came in
    plain = augmenter(target, BNSCEOptions(augment=False), seed=3)
    assert plain(x) is x


def test_the_image_priors_match_a_direct_float64_computation():
    x = torch.randn(5, 3, 6, 7) * 2 + 0.5
    a = x.double().numpy()
    tv1 = np.abs(np.diff(a, axis=2)).mean() + np.abs(np.diff(a, axis=3)).mean()
    assert float(total_variation_l1(x)) == pytest.approx(tv1, rel=1e-6)
    mean, var = a.mean(axis=(0, 2, 3)), a.var(axis=(0, 2, 3))  # batch channel statistics, ddof 0
    want = np.linalg.norm(mean) + np.linalg.norm(var - 1)
    assert float(input_batch_loss(x)) == pytest.approx(want, rel=1e-5)


def test_the_sparse_edge_prior_and_the_input_term_act_on_the_images():
    base = {"n": 16, "iterations": 120, "augment": False, "tv_l1_weight": 0.0, "input_weight": 0.0}
    plain = _make("synthetic:bns-ce", **base)
    sparse = _make("synthetic:bns-ce", **{**base, "tv_l1_weight": 5.0})
    assert float(total_variation_l1(sparse.images)) < 0.8 * float(total_variation_l1(plain.images))
    assert sparse.identity != plain.identity
    # CE alone drifts the pixel statistics; the input term holds them at the normalisation's N(0, 1)
    drift = _make("synthetic:bns-ce", bn_weight=0.0, lr=0.3, **base)
    held = _make("synthetic:bns-ce", bn_weight=0.0, lr=0.3, **{**base, "input_weight": 10.0})
    assert float(input_batch_loss(held.images)) < 0.5 * float(input_batch_loss(drift.images))


def test_the_card_says_what_the_loss_saw():
    on = _make("synthetic:bns-ce", n=4, iterations=2, clamp=True)
    off = _make("synthetic:bns-ce", n=4, iterations=2, clamp=True, augment=False)
    assert on.card()["loss_on"] == "augmented copies: random 4-pixel pad-crop (black padding) + horizontal flip"
    assert off.card()["loss_on"] == "the images as they are" and off.identity != on.identity


def test_augmenting_without_the_input_normalisation_names_the_fix():
    with pytest.raises(ConfigError, match=r"augment.*normalisation.*augment: false"):
        make_images(parse_data_source("synthetic:bns-ce"), _trained_like(), SIZE, 10, 4, 0, "cpu", False,
                    {"iterations": 1, "clamp": False})


def test_cache_returns_the_same_images_and_regenerates_when_the_weights_change():
    a = _make("synthetic:zeroq", iterations=10)
    b = _make("synthetic:zeroq", iterations=10)
    assert not a.cached and b.cached and torch.equal(a.images, b.images) and b.identity == a.identity
    changed = build_model("digits_cnn").eval()
    changed.load_state_dict(_trained_like().state_dict())
    with torch.no_grad():
        changed.fc.weight.add_(0.01)
    c = make_images(parse_data_source("synthetic:zeroq"), changed, SIZE, 10, 16, 0, "cpu", False,
                    {"iterations": 10, "clamp": False})
    assert not c.cached and c.identity != a.identity


def test_a_model_without_batch_norm_is_refused_by_name():
    plain = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(NoBatchNormError, match=r"no BatchNorm layer.*--calib-data real"):
        make_images(parse_data_source("synthetic:zeroq"), plain, SIZE, 10, 4, 0, "cpu", False)


# ---------------------------------------------------------------------------------------------- consumers
def test_ptq_calibrates_on_synthetic_images_and_the_card_says_so(tmp_path):
    out, card = tmp_path / "r.json", tmp_path / "c.json"
    res = runner.invoke(app, ["ptq", "--model", "digits_cnn", "--data", "digits", "--calib-data", "synthetic:zeroq:8",
                              "--calib-size", "8", "--max-test", "64", "--quiet", "--out", str(out), "--card",
                              str(card)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["calib_data"] == "synthetic:zeroq:8" and r["n_calib"] == 8
    c = json.loads(card.read_text())["resource_complexity"]
    assert c["calibration_data"].startswith("synthetic (zeroq), 8 images") and "data-free" in c["calibration_data"]
    assert c["data_generation"]["real_images_used"] == 0 and c["data_generation"]["generation_seconds"] > 0


@pytest.mark.parametrize("method", ["adaround", "qdrop"])
def test_reconstruction_runs_on_synthetic_images(method):
    cfg = PTQConfig(model="digits_cnn", data="digits", backend="tensorrt", w_bits=4, a_bits=4, calib_size=16,
                    calib_data="synthetic:bns-ce", synthetic_options={"iterations": 10}, method=method,
                    recon={"iters": 3, "recon_size": 24, "batch_size": 8}, max_test=64)
    r = run_ptq(cfg, progress=False)
    assert r.extra["data_source"]["images"] == 24  # one set for calibration and reconstruction
    assert r.extra["reconstruction"]["n_images"] == 24 and r.n_calib == 16


def test_bn_recalibration_runs_on_noise():
    cfg = PTQConfig(model="digits_cnn", data="digits", calib_size=16, calib_data="noise", bn_calib=True, max_test=32)
    r = run_ptq(cfg, progress=False)
    assert r.extra["data_source"]["type"] == "noise"


def test_qat_initialises_from_synthetic_images(tmp_path):
    res = runner.invoke(app, ["qat", "--model", "digits_cnn", "--data", "digits", "--backend", "tensorrt",
                              "--w-bits", "4", "--a-bits", "4", "--epochs", "1", "--max-train", "64",
                              "--max-test", "64", "--batch-size", "32", "--calib-data", "noise:16",
                              "--out-dir", str(tmp_path / "q"), "--threads", "1", "--quiet"])
    assert res.exit_code == 0, res.output


def test_a_sweep_runs_on_synthetic_data_and_the_report_shows_the_set(tmp_path):
    from quantbench.report.html import render_report
    from quantbench.store import RunRow
    from quantbench.sweep.execute import execute
    from quantbench.sweep.expand import expand
    from quantbench.sweep.load import parse_sweep
    from quantbench.sweep.methods import ContextCache
    from tests.test_sweep_plugin import tiny_sweep

    method = {"kind": "ptq", "calibrator": "minmax", "calib_size": 8, "calib_batch_size": 8,
              "calib_data": "synthetic:zeroq:8", "synthetic_options": {"iterations": 5}}
    job = expand(parse_sweep(tiny_sweep(backends=["tensorrt"], methods=[method]), tmp_path)).jobs[0]
    record = execute(job, ContextCache())
    assert record.status == "done", record.error
    gen = record.card["resource_complexity"]["data_generation"]
    assert gen["type"] == "synthetic (zeroq)" and gen["images"] == 8
    row = RunRow(run_id=job.run_id, status="done", model="digits_cnn", data="digits", backend="tensorrt",
                 w_bits=8, a_bits=8, fp_top1=10.0, quant_top1=10.0, agreement=1.0, card=record.card,
                 metrics=record.metrics, config=job.config, method="ptq", method_label="x")
    html = render_report([row])
    assert 'id="synthetic"' in html and "generated images" in html and "loss curve" in html


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2", "regnet_x_400mf", "efficientnet_b0", "resnet20_cifar"])
def test_generators_work_on_torchvision_and_cifar_models(model):
    net = build_model(model, num_classes=10).eval()
    e = get_entry(model)
    for gen in ("zeroq", "bns-ce"):
        out = make_images(parse_data_source(f"synthetic:{gen}"), net, (3, 32, 32), 10, 2, 0, "cpu", False,
                          {"iterations": 2, "batch_size": 2}, e.mean, e.std)
        assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()
        assert len(out.loss_curve) == 2
