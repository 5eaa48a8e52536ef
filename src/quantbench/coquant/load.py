"""Rebuild a CoQuant run (``final.pt``) as a switchable graph, or as an ordinary QAT graph at one bit-width."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from quantbench.coquant.config import CoQuantConfig
from quantbench.coquant.switch import Switched, freeze_at, make_switchable, nearest_trained
from quantbench.data import calibration_subset, load_data, make_loader
from quantbench.errors import CheckpointError, ConfigError
from quantbench.graph.quantize import prepare
from quantbench.models import build_model, get_entry
from quantbench.ptq import calibrate
from quantbench.qat.checkpoint import load_checkpoint
from quantbench.qat.prepare import prepare_qat
from quantbench.qat.quantizers import ALGORITHMS


def is_coquant_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    ckpt = load_checkpoint(p / "final.pt" if p.is_dir() else p)
    return "bits" in ckpt and "bits" in ckpt.get("config", {})


def coquant_config_of(path: str | Path) -> CoQuantConfig:
    """The config a CoQuant run was trained with (from its ``final.pt``), without rebuilding the network."""
    p = Path(path)
    return CoQuantConfig.model_validate(load_checkpoint(p / "final.pt" if p.is_dir() else p)["config"])


def load_coquant_run(path: str | Path) -> tuple[fx.GraphModule, Switched, CoQuantConfig]:
    """The trained switchable graph, its switch and its config. The graph is prepared and calibrated on a few
    images again (that decides every quantizer's shape and signedness as in training), then the checkpoint's
    values replace the calibration's."""
    p = Path(path)
    ckpt = load_checkpoint(p / "final.pt" if p.is_dir() else p)
    cfg = CoQuantConfig.model_validate(ckpt["config"])
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size, augment=False)
    model = build_model(cfg.model, None, cfg.width_mult, num_classes=bundle.num_classes)
    w_obs, a_obs = cfg.observers()
    gm = prepare(model, cfg.resolved_backend(), torch.zeros(1, *entry.input_size), w_obs, a_obs,
                 cfg.w_observer_options, cfg.a_observer_options)
    calibrate(gm, make_loader(calibration_subset(bundle, min(cfg.calib_size, 64), cfg.seed), 64), progress=False)
    prepare_qat(gm, cfg.algorithm, cfg.bn_fold, cfg.init, cfg.algorithm_options, cfg.bn_freeze_step)
    alg = ALGORITHMS.get(cfg.algorithm)
    opts = alg.parse_options(cfg.algorithm_options)
    sw = make_switchable(gm, tuple(cfg.bits), lambda _r: (lambda ctx: alg.build(ctx, opts)), opts)
    for b in ckpt["bits"]:  # bit-widths evaluated zero-shot after training have their own rules and BNs
        if b in sw.state.trained:
            continue
        like = nearest_trained(sw.state.trained, b)
        for rule in sw.rules.values():  # the structure only: the checkpoint holds the values
            rule.add_bits(b, rule.at(like))
        for sbn in sw.bns.values():
            sbn.add_bits(b, like)
    try:
        gm.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{p}: the CoQuant checkpoint does not match {cfg.model!r} rebuilt from its config: "
                              f"{str(exc).splitlines()[0]}") from exc
    return gm.eval(), sw, cfg


def load_coquant_at(path: str | Path, bits: int | None) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The run fixed at ``bits`` (an ordinary QAT graph: bake, export and verify take it) and its config."""
    gm, sw, cfg = load_coquant_run(path)
    have = sorted({b for sbn in sw.bns.values() for b in sbn.bits} or set(sw.state.trained), reverse=True)
    if bits is None or bits not in have:
        raise ConfigError(f"{path} is a CoQuant run: give --bits, one of {have} (the trained set "
                          f"{list(sw.state.trained)} and the bit-widths it was evaluated at after BN calibration)")
    entry = get_entry(cfg.model)
    config = {"model": cfg.model, "weights": cfg.weights, "width_mult": cfg.width_mult,
              "input_size": list(entry.input_size), "mean": list(entry.mean), "std": list(entry.std),
              "data": cfg.data, "coquant": {"trained_bits": list(sw.state.trained), "bits": bits, "run": str(path)}}
    return freeze_at(gm, bits).eval(), config
