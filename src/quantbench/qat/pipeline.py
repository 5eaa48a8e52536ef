"""One QAT run end to end: load, prepare for the backend, calibrate (PTQ init), train, evaluate, report."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from quantbench.data import TensorImageDataset, calibration_subset, load_data, make_loader
from quantbench.datafree.source import make_images, parse_data_source
from quantbench.graph.quantize import list_layers, prepare
from quantbench.models import build_model, get_entry
from quantbench.ptq import calibrate, compare, predict
from quantbench.ptq.calibrate import estimate_bn_statistics
from quantbench.ptq.pipeline import PTQResult
from quantbench.qat.checkpoint import save_checkpoint
from quantbench.qat.config import QATConfig
from quantbench.qat.data import TrainBatches
from quantbench.qat.diagnostics import plot_clipping_ranges, plot_curves
from quantbench.qat.distributed import DistContext, init_distributed
from quantbench.qat.prepare import initialize_from_data, prepare_qat, quantizer_table, set_fused_kernels
from quantbench.qat.train import LossFn, Trainer, check_run_dir
from quantbench.utils.io import atomic_write_json, atomic_write_text


@dataclass
class QATResult(PTQResult):
    """``quantbench ptq``'s keys plus the algorithm, the recipe and the training time."""

    algorithm: str = "lsq"
    bn_fold: int = 3
    init: str = "calibrator"
    init_top1: float = 0.0  # the PTQ-initialised model before training
    epochs: int = 0
    batch_size: int = 0
    lr: float = 0.0
    train_seconds: float = 0.0
    seconds_per_epoch: float = 0.0
    world_size: int = 1
    n_train: int = 0  # training images
    amp: str = "none"
    out_dir: str = ""


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _train_set(train: Any, max_train: int | None) -> Any:
    if max_train is None or max_train >= len(train):
        return train
    if isinstance(train, TensorImageDataset):
        return train.subset(range(max_train))
    return Subset(train, range(max_train))


@dataclass
class PreparedRun:
    """A calibrated, QAT-prepared graph with its data and the FP32 reference predictions (main process)."""

    gm: nn.Module
    train: Any
    test_loader: Any
    fp_pred: torch.Tensor
    labels: torch.Tensor
    observers: tuple[str, str]
    calib_seconds: float
    init_top1: float


def _calibration_set(cfg: QATConfig, ctx: DistContext, bundle: Any, model: nn.Module, progress: bool) -> Any:
    """The images of the PTQ calibration that initialises QAT: real, noise or synthetic (``calib_data``)."""
    src = parse_data_source(cfg.calib_data)
    if src.kind == "real":
        return calibration_subset(bundle, cfg.calib_size, cfg.seed)
    entry = get_entry(cfg.model)  # noise / synthetic images for the PTQ init; training stays on the training split
    made = make_images(src, model, entry.input_size, bundle.num_classes, cfg.calib_size, cfg.seed, ctx.device,
                       progress, cfg.synthetic_options, entry.mean, entry.std)
    return made.dataset(cfg.calib_size)


def prepare_run(cfg: QATConfig, ctx: DistContext, progress: bool = True) -> PreparedRun:
    """Load model and data, prepare the backend's graph, calibrate it (the PTQ init) and swap in QAT modules."""
    main = ctx.is_main
    seed_everything(cfg.seed)
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size, augment=False)
    model = build_model(cfg.model, cfg.weights, cfg.width_mult, num_classes=bundle.num_classes).to(ctx.device)
    test = bundle.test
    if cfg.max_test is not None and cfg.max_test < len(test):  # type: ignore[arg-type]
        test = Subset(test, range(cfg.max_test))
    test_loader = make_loader(test, cfg.eval_batch_size)
    calib_set = _calibration_set(cfg, ctx, bundle, model, progress and main)
    calib_loader = make_loader(calib_set, cfg.calib_batch_size)
    if cfg.weights is None:
        # from scratch: BN's default running statistics (0 / 1) describe nothing yet; activation ranges calibrated
        # in eval mode on them are far narrower than what the training-mode network produces, and the clipped
        # activations pass no gradient (QAT from scratch then stays at chance)
        estimate_bn_statistics(model, calib_loader, ctx.device)
    fp_pred, labels = (predict(model.eval(), test_loader, ctx.device, progress and main, "evaluating FP32")
                       if main else (torch.empty(0), torch.empty(0)))
    w_obs, a_obs = cfg.observers()
    example = bundle.test[0][0].unsqueeze(0).to(ctx.device)
    gm = prepare(model, cfg.resolved_backend(), example, w_obs, a_obs, cfg.w_observer_options,
                 cfg.a_observer_options)
    t0 = time.perf_counter()
    calibrate(gm, calib_loader, ctx.device, progress and main)
    calib_seconds = time.perf_counter() - t0
    prepare_qat(gm, cfg.algorithm, cfg.bn_fold, cfg.init, cfg.algorithm_options, cfg.bn_freeze_step)
    set_fused_kernels(gm, cfg.fused_kernels)
    initialize_from_data(gm, next(iter(calib_loader))[0].to(ctx.device))
    if cfg.bn_init:
        estimate_bn_statistics(gm, calib_loader, ctx.device)
    init_top1 = 0.0
    if main:
        q_pred = predict(gm, test_loader, ctx.device, progress, "evaluating PTQ init")[0]
        init_top1 = compare(fp_pred, q_pred, labels).quant_top1
    return PreparedRun(gm, _train_set(bundle.train, cfg.max_train), test_loader, fp_pred, labels, (w_obs, a_obs),
                       calib_seconds, init_top1)


def make_trainer(cfg: QATConfig, run: PreparedRun, ctx: DistContext, progress: bool = True,
                 compute_loss: LossFn | None = None) -> Trainer:
    """The trainer for a prepared run (test accuracy on the main process); ``compute_loss`` replaces cross-entropy."""

    def evaluate(m: nn.Module) -> float:
        return compare(run.fp_pred, predict(m, run.test_loader, ctx.device, False)[0], run.labels).quant_top1

    batches = TrainBatches(run.train, cfg.batch_size, ctx.world, ctx.rank, cfg.seed, cfg.augment)
    return Trainer(run.gm, cfg, batches, ctx, cfg.run_dir(), evaluate if ctx.is_main else None, progress,
                   compute_loss)


def run_qat(cfg: QATConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> QATResult:
    """Quantization-aware training of one configuration (a process of a ``torchrun`` group, or alone).

    The run folder (:meth:`QATConfig.run_dir`) must not hold a checkpoint unless ``resume`` (continue it) or
    ``overwrite`` (delete its run files first); ``resume`` needs one. Both are checked before any work.
    """
    cfg.check()
    out_dir = cfg.run_dir()
    ctx = init_distributed(cfg.device)
    main = ctx.is_main
    check_run_dir(out_dir, resume, overwrite, remove=main)  # every process refuses alike; rank 0 deletes
    ctx.barrier()
    spec = cfg.resolved_backend()
    run = prepare_run(cfg, ctx, progress)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    outcome = make_trainer(cfg, run, ctx, progress).fit(resume)

    gm = run.gm
    ev = (compare(run.fp_pred, predict(gm, run.test_loader, ctx.device, progress, "evaluating QAT")[0], run.labels)
          if main else None)
    table = quantizer_table(gm)  # type: ignore[arg-type]
    p = spec.placement
    w_obs, a_obs = run.observers
    result = QATResult(
        model=cfg.model, backend=spec.name, w_bits=spec.weight.bits, a_bits=spec.activation.bits,
        w_observer=w_obs, a_observer=a_obs, fp_top1=ev.fp_top1 if ev else 0.0,
        quant_top1=ev.quant_top1 if ev else 0.0, agreement=ev.agreement if ev else 0.0,
        calib_seconds=run.calib_seconds, n_test=ev.n if ev else 0, n_calib=cfg.calib_size, bn_calib=False,
        first_last=str(spec.first_last), residual="quantized" if p.mode == "outputs" and p.add_output else "fp",
        skip="quantized" if p.mode == "outputs" and p.add_inputs else "fp", n_quantizers=len(table),
        layers=[asdict(layer) for layer in list_layers(gm)],
        device=cfg.device, weights=cfg.weights, data=cfg.data,
        extra={"history_points": len(outcome.history), "resumed_from_epoch": outcome.resumed_from_epoch,
               "warnings": outcome.warnings},
        algorithm=cfg.algorithm, bn_fold=cfg.bn_fold, init=cfg.init, init_top1=run.init_top1, epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.resolved()["lr"], train_seconds=outcome.seconds,
        seconds_per_epoch=outcome.seconds / max(cfg.epochs, 1), world_size=ctx.world, n_train=len(run.train),
        amp=cfg.amp,
        out_dir=str(out_dir),
    )
    if main:
        write_artefacts(gm, cfg, result, table, outcome.history, out_dir)
    return result


def write_artefacts(gm: nn.Module, cfg: QATConfig, result: QATResult, table: list[dict[str, Any]],
                    history: list[dict[str, Any]], out_dir: Path) -> None:
    """The final checkpoint (every scale and zero-point), ``quantizers.json`` and the two plots."""
    metrics = {k: v for k, v in result.to_dict().items() if isinstance(v, (int, float, str)) and v is not None}
    save_checkpoint(out_dir / "final.pt", {"config": cfg.model_dump(mode="json"), "model": gm.state_dict(),
                                           "quantizers": table, "metrics": metrics})
    atomic_write_json(out_dir / "quantizers.json", table)
    title = f"{cfg.model} {cfg.algorithm} W{result.w_bits}A{result.a_bits} {result.backend}"
    plot_curves(history, out_dir / "curves.png", title)
    plot_clipping_ranges(table, out_dir / "clipping_ranges.png", f"activation clipping ranges: {title}")
    atomic_write_text(out_dir / "result.json", json.dumps(result.to_dict(), indent=2, default=str) + "\n")
