"""Rebuild the QAT graph a ``quantbench qat`` run saved (``final.pt``), for export and evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from quantbench.errors import CheckpointError
from quantbench.graph.quantize import all_quantizers, calibrate_weights, prepare
from quantbench.models import build_model, get_entry
from quantbench.qat.checkpoint import load_checkpoint
from quantbench.qat.config import QATConfig
from quantbench.qat.prepare import prepare_qat


def _trained_classes(state: dict[str, Any], last_layer: str) -> int | None:
    """The class count the run trained with: the output size of its last layer in the checkpoint."""
    w = state.get(f"{last_layer}.module.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else None


def rebuild_graph(cfg: QATConfig, num_classes: int) -> fx.GraphModule:
    """The QAT graph of ``cfg`` with placeholder parameters, ready for a checkpoint's state dict."""
    entry = get_entry(cfg.model)
    model = build_model(cfg.model, None, cfg.width_mult, num_classes)
    w_obs, a_obs = cfg.observers()
    gm = prepare(model, cfg.resolved_backend(), torch.zeros(1, *entry.input_size), w_obs, a_obs,
                 cfg.w_observer_options, cfg.a_observer_options)
    calibrate_weights(gm)  # gives per-channel parameters their shapes; the checkpoint holds the trained values
    for q in all_quantizers(gm):  # activation placeholders, overwritten by the checkpoint as well
        q.calibrated_t = torch.tensor(True)
    return prepare_qat(gm, cfg.algorithm, cfg.bn_fold, "calibrator", cfg.algorithm_options, cfg.bn_freeze_step)


def trained_classes(state: dict[str, Any], gm: fx.GraphModule) -> int | None:
    """The class count a checkpoint's model was trained with (None: not found)."""
    return _trained_classes(state, gm.meta["quantbench"]["last_layer"])


def load_qat_run(path: str | Path) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The QAT graph saved by a ``quantbench qat`` run (``final.pt``, or its folder) and its config.

    The model is rebuilt with the class count the run trained with (a torchvision model trained on a 10-class
    dataset has 10 outputs, not the registry's 1000).
    """
    p = Path(path)
    ckpt = load_checkpoint(p / "final.pt" if p.is_dir() else p)
    cfg = QATConfig.model_validate(ckpt["config"])
    entry = get_entry(cfg.model)
    num_classes = entry.num_classes
    gm = rebuild_graph(cfg, num_classes)
    trained = _trained_classes(ckpt["model"], gm.meta["quantbench"]["last_layer"])
    if trained is not None and trained != num_classes:
        num_classes = trained
        gm = rebuild_graph(cfg, num_classes)
    try:
        gm.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{p}: the QAT checkpoint does not match {cfg.model!r} rebuilt from its config: "
                              f"{str(exc).splitlines()[0]}") from exc
    w_obs, a_obs = cfg.observers()
    config = {"model": cfg.model, "weights": cfg.weights, "width_mult": cfg.width_mult,
              "num_classes": num_classes, "input_size": list(entry.input_size), "mean": list(entry.mean),
              "std": list(entry.std), "data": cfg.data, "w_observer": w_obs, "a_observer": a_obs,
              "qat": {"algorithm": cfg.algorithm, "bn_fold": cfg.bn_fold, "run": str(p)}}
    return gm.eval(), config
