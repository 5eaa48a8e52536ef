"""Model + data + calibration for the deployment commands (the same options as ``quantbench ptq``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from quantbench.backends.spec import BackendSpec
from quantbench.config import PTQConfig
from quantbench.data import DataBundle, calibration_subset, load_data, make_loader
from quantbench.errors import ConfigError
from quantbench.graph.quantize import prepare
from quantbench.models import build_model, get_entry
from quantbench.ptq import bn_recalibrate, calibrate
from quantbench.ptq.pipeline import bn_calibration_set


@dataclass
class Calibrated:
    """A calibrated simulation and what rebuilding or evaluating it needs."""

    gm: fx.GraphModule
    spec: BackendSpec
    example: torch.Tensor
    bundle: DataBundle
    config: dict[str, Any]  # for the simulation checkpoint and the ONNX metadata


def resolved_spec(cfg: PTQConfig, reduce_range: bool = False) -> BackendSpec:
    spec = cfg.resolved_backend()
    if reduce_range:
        try:
            spec = spec.configure(reduce_range=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return spec


def calibrated_model(cfg: PTQConfig, reduce_range: bool = False, progress: bool = True) -> Calibrated:
    """Build, prepare and calibrate ``cfg.model`` for ``cfg.backend`` (PTQ, as ``quantbench ptq`` does)."""
    torch.manual_seed(cfg.seed)
    spec = resolved_spec(cfg, reduce_range)
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size)
    model = build_model(cfg.model, cfg.weights, cfg.width_mult, num_classes=bundle.num_classes).to(cfg.device)
    example = bundle.test[0][0].unsqueeze(0).to(cfg.device)
    gm = prepare(model, spec, example, cfg.w_observer, cfg.a_observer, cfg.w_observer_options,
                 cfg.a_observer_options)
    calib = calibration_subset(bundle, cfg.calib_size, cfg.seed)
    calibrate(gm, make_loader(calib, cfg.calib_batch_size), cfg.device, progress)
    if cfg.bn_calib:
        bn_set = bn_calibration_set(cfg, bundle, calib, tuple(example.shape[1:]))
        bn_recalibrate(gm, make_loader(bn_set, cfg.calib_batch_size), cfg.device, progress)
    config = {
        "model": cfg.model, "weights": cfg.weights, "width_mult": cfg.width_mult, "num_classes": bundle.num_classes,
        "input_size": list(example.shape[1:]), "mean": list(entry.mean), "std": list(entry.std), "data": cfg.data,
        "w_observer": cfg.w_observer, "a_observer": cfg.a_observer, "calib_size": cfg.calib_size,
        "bn_calib": cfg.bn_calib, "seed": cfg.seed, "reduce_range": spec.reduce_range,
    }
    return Calibrated(gm.eval(), spec, example, bundle, config)
