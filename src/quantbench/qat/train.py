"""The QAT training loop: the unified recipe, logging, atomic epoch checkpoints, exact resume, divergence stop."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from quantbench.errors import CheckpointError, ConfigError
from quantbench.qat.checkpoint import ResumeMismatchError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from quantbench.qat.config import QATConfig, config_diff
from quantbench.qat.data import TrainBatches
from quantbench.qat.diagnostics import (
    EMA,
    DivergenceError,
    DivergenceMonitor,
    DivergenceWarning,
    JsonLog,
    find_diverged,
    non_finite_tensors,
)
from quantbench.qat.distributed import DistContext, wrap_ddp
from quantbench.qat.prepare import quantizer_parameters, quantizer_table
from quantbench.qat.recipe import build_optimizer, cosine_schedule, multistep_schedule

#: ``loss(model, x, y) -> (loss, logits)``: what one training step minimises (CoQuant sums several precisions);
#: the logits give the logged training accuracy
LossFn = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
#: every file a run writes in its folder (``--overwrite`` removes them before training starts)
RUN_FILES = (CHECKPOINT, LOG, "config.yaml", "final.pt", "quantizers.json", "curves.png", "clipping_ranges.png",
             "result.json")


class RunFolderError(ConfigError):
    """A run folder that holds another run's checkpoint, or ``--resume`` with nothing to resume."""


def nothing_to_resume(out_dir: Path) -> RunFolderError:
    return RunFolderError(f"--resume: {out_dir} holds no {CHECKPOINT} to resume from; check --out-dir (or the "
                          f"run's settings, which name its default folder) or drop --resume to start anew")


def check_run_dir(out_dir: Path, resume: bool = False, overwrite: bool = False, remove: bool = True) -> None:
    """Refuse to train into a folder holding a checkpoint unless resuming or overwriting (then, with
    ``remove``, its run files are deleted first), and refuse ``resume`` when there is no checkpoint."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: give one of them")
    ckpt = out_dir / CHECKPOINT
    if resume:
        if not ckpt.is_file():
            raise nothing_to_resume(out_dir)
        return
    if not ckpt.is_file():
        return
    if not overwrite:
        raise RunFolderError(f"{out_dir} holds the checkpoint of an earlier run ({ckpt}): pass --resume to "
                             "continue it, --overwrite to delete it and start anew, or another --out-dir")
    for name in RUN_FILES if remove else ():
        (out_dir / name).unlink(missing_ok=True)


@dataclass
class TrainOutcome:
    epochs: int
    steps: int
    seconds: float
    resumed_from_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """The divergence warnings of the run (``warning`` records of the log)."""
        return [r["message"] for r in self.history if r.get("event") == "warning"]


class LossStep(nn.Module):
    """One training step's loss as a module, ``forward(x, y) = loss_fn(gm, x, y)``: what DDP wraps."""

    def __init__(self, gm: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.gm = gm
        self.loss_fn = loss_fn

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.loss_fn(self.gm, x, y)


class Trainer:
    """Trains a QAT graph with SGD (momentum 0.9), per-iteration cosine decay and a separate parameter group
    for the quantizers; logs train accuracy every ``log_every`` iterations (EMA, momentum 0.3) and test
    accuracy every ``eval_every``; checkpoints atomically after every epoch (model, optimizer, scheduler,
    quantizer and RNG state). ``evaluate(model) -> top-1 %`` runs on the main process only."""

    def __init__(self, gm: nn.Module, cfg: QATConfig, batches: TrainBatches, ctx: DistContext, out_dir: Path,
                 evaluate: Callable[[nn.Module], float] | None = None, progress: bool = True,
                 compute_loss: LossFn | None = None) -> None:
        self.gm, self.cfg, self.batches, self.ctx, self.out_dir = gm, cfg, batches, ctx, Path(out_dir)
        self.evaluate, self.progress = evaluate, progress and ctx.is_main
        r = cfg.resolved()
        self.opt = build_optimizer(gm, quantizer_parameters(gm), r["lr"], r["weight_decay"], r["quantizer_lr"],
                                   r["quantizer_weight_decay"], cfg.momentum, cfg.nesterov)
        warmup = cfg.warmup_steps + round(cfg.warmup_epochs * len(batches))
        self.sched = (multistep_schedule(self.opt, [m * len(batches) for m in cfg.milestones], cfg.gamma, warmup)
                      if cfg.schedule == "multistep" else cosine_schedule(self.opt, cfg.epochs * len(batches), warmup))
        self.compute_loss = compute_loss or self.cross_entropy
        # DDP wraps the whole loss: a loss with several forwards per step (CoQuant: one per precision) is then one
        # DDP forward, so gradients are reduced once per step
        self.model = wrap_ddp(LossStep(gm, self.compute_loss), ctx, find_unused=compute_loss is not None)
        self.eval_every: int = r["eval_every"]
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.log = JsonLog(self.out_dir / LOG, ctx.is_main)
        self.ema = EMA(0.3)
        self.monitor = DivergenceMonitor()
        self.num_classes = 0  # from the logits of the first step
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # epochs completed
        self.step = 0
        self.meter = torch.zeros(3, dtype=torch.float64)  # correct, seen, loss sum since the last log
        self.last_test_step = -1
        self.t_train = 0.0

    # ------------------------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"config": self.cfg.identity(), "epoch": self.epoch, "step": self.step,
                "model": self.gm.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "quantizers": quantizer_table(self.gm),  # type: ignore[arg-type]
                "rng": rng_state(),
                "train_state": {"ema": self.ema.value, "history": self.history, "meter": self.meter.tolist(),
                                "last_test_step": self.last_test_step, "seconds": self.t_train,
                                "monitor": self.monitor.state(), "num_classes": self.num_classes}}

    def save(self) -> None:
        """Write the epoch checkpoint; weights that are not finite stop training instead (every process sees
        the same weights), so a good checkpoint is never replaced by a broken one."""
        bad = non_finite_tensors(self.gm.state_dict())
        if bad:
            self.stop(f"after epoch {self.epoch} the weights are not finite ({bad[0]!r}"
                      + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + "); its checkpoint was not written",
                      self.epoch - 1, "diverged")
        if self.ctx.is_main:
            save_checkpoint(self.ckpt_path, self.state())
        self.ctx.barrier()

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoint.pt`` if it exists (refusing one from another configuration)."""
        if not self.ckpt_path.is_file():
            return False
        ckpt = load_checkpoint(self.ckpt_path, self.ctx.device)
        diff = config_diff(ckpt["config"], self.cfg.identity())
        if diff:
            raise ResumeMismatchError(
                f"cannot resume from {self.ckpt_path}: it was written by a run with another configuration:\n  "
                + "\n  ".join(diff) + "\nresume with the same settings, or give another --out-dir to start anew")
        self.gm.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        ts = ckpt["train_state"]
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.ema.value, self.history = ts["ema"], list(ts["history"])
        self.meter = torch.tensor(ts["meter"], dtype=torch.float64)
        self.last_test_step, self.t_train = int(ts["last_test_step"]), float(ts["seconds"])
        if "monitor" in ts:  # checkpoints of earlier versions have none
            self.monitor.load(ts["monitor"])
            self.num_classes = int(ts["num_classes"])
        self.log.rewrite(self.history)
        return True

    # ------------------------------------------------------------------------------------ logging
    def record(self, rec: dict[str, Any]) -> None:
        if self.ctx.is_main:
            self.history.append(rec)
            self.log.write(rec)

    def log_train(self, epoch: int) -> dict[str, Any]:
        m = self.ctx.all_sum(self.meter.clone())
        acc = 100.0 * float(m[0]) / max(float(m[1]), 1.0)
        rec = {"event": "train", "epoch": epoch + 1, "step": self.step, "loss": float(m[2]) / max(float(m[1]), 1.0),
               "train_top1": acc, "train_top1_ema": self.ema.update(acc), "lr": self.opt.param_groups[0]["lr"],
               "seconds": self.t_train}
        self.record(rec)
        self.meter.zero_()
        # a loss summing several per-sample losses (CoQuant: one per precision) says how many, via ``terms()``
        terms = getattr(self.compute_loss, "terms", None)
        message = self.monitor.on_train(rec["loss"] / (terms() if callable(terms) else 1.0), self.num_classes)
        if message:
            self.warn(message, epoch, stoppable=True)
        return rec

    def log_test(self, epoch: int) -> None:
        """Test accuracy on the main process (the others go on; the next collective waits for it)."""
        if self.last_test_step == self.step:
            return
        self.last_test_step = self.step
        if self.evaluate is not None:
            top1 = self.evaluate(self.gm)
            self.gm.train()
            self.record({"event": "test", "epoch": epoch + 1, "step": self.step, "test_top1": top1})
            message = self.monitor.on_test(top1, self.num_classes)
            if message:  # a warning only: the test runs on the main process, a stop must be collective
                self.warn(message, epoch, stoppable=False)

    # ------------------------------------------------------------------------------------ training
    def train_step(self, x: Tensor, y: Tensor, epoch: int) -> None:
        dev = self.ctx.device
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.amp == "bf16"):
            loss, logits = self.model(x, y)
        self.num_classes = int(logits.shape[-1])
        bad = self.ctx.all_sum(torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=dev))
        if float(bad) > 0:
            self.diverged(x, float(loss.detach()), epoch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        with torch.no_grad():
            n = y.numel()
            self.meter += torch.tensor([float((logits.argmax(1) == y).sum()), n, float(loss) * n],
                                       dtype=torch.float64)

    def cross_entropy(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The default loss: cross-entropy (with the configured label smoothing) of one forward."""
        logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing), logits

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * len(self.batches)

    def diverged(self, x: Tensor, loss: float, epoch: int) -> None:
        """The loss is NaN or infinite: log it, name the quantizer, stop."""
        where = find_diverged(self.gm, x)
        self.record({"event": "diverged", "epoch": epoch + 1, "step": self.step, "loss": str(loss), "cause": where})
        self.stop(f"the loss became {loss} at epoch {epoch + 1}, iteration {self.step + 1}: {where}", epoch, None)

    def warn(self, message: str, epoch: int, stoppable: bool) -> None:
        """A finite divergence: a ``warning`` log record and a :class:`DivergenceWarning`; with
        ``on_divergence: stop`` a ``stoppable`` one (seen alike by every process) follows the NaN policy:
        training stops, keeping the last good checkpoint."""
        self.record({"event": "warning", "epoch": epoch + 1, "step": self.step, "message": message})
        if stoppable and self.cfg.on_divergence == "stop":
            self.stop(f"{message} (epoch {epoch + 1}, iteration {self.step}; on_divergence: stop)", epoch, "diverged")
        hint = "; --on-divergence stop ends such a run" if stoppable else ""
        warnings.warn(f"{message} at epoch {epoch + 1}, iteration {self.step}: lower --lr (or the quantizer "
                      f"learning rate){hint}", DivergenceWarning, stacklevel=2)

    def stop(self, what: str, epoch: int, event: str | None) -> None:
        """Raise :class:`DivergenceError` saying which checkpoint, if any, is good (logging ``event``)."""
        if event is not None:
            self.record({"event": event, "epoch": epoch + 1, "step": self.step, "cause": what})
        raise DivergenceError(f"{what}. Training stopped; {self.kept_checkpoint()}. Lower --lr (or the quantizer "
                              "learning rate), or initialise from another calibrator")

    def kept_checkpoint(self) -> str:
        """Which checkpoint is good: one is only called good when it loads and all its weights are finite."""
        if not self.ckpt_path.is_file():
            return ("no checkpoint was written (it diverged in the first epoch)" if self.epoch == 0
                    else f"no checkpoint was written to {self.ckpt_path}")
        try:
            ckpt = load_checkpoint(self.ckpt_path, "cpu")
            bad = non_finite_tensors(ckpt["model"])
        except (CheckpointError, KeyError) as exc:
            return f"there is no good checkpoint: {self.ckpt_path} cannot be read ({exc})"
        if bad:
            return (f"there is no good checkpoint: {self.ckpt_path} (after epoch {ckpt['epoch']}) holds non-finite "
                    f"weights ({bad[0]!r}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + ")")
        return f"the last good checkpoint (after epoch {ckpt['epoch']}) is kept at {self.ckpt_path}"

    def _progress(self) -> Progress:
        return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                        disable=not self.progress, transient=False)

    def fit(self, resume: bool = False) -> TrainOutcome:
        """Train ``cfg.epochs`` epochs (the rest of them after a resume)."""
        if resume and not self.resume():
            raise nothing_to_resume(self.out_dir)
        resumed = self.epoch if resume else None
        if resumed is None:
            self.log.rewrite([])
            self.log_test(-1)  # the PTQ-initialised model at iteration 0
        k = self.cfg.log_every
        with self._progress() as bar:
            task = bar.add_task("QAT", total=self.cfg.epochs * len(self.batches), completed=self.step, status="")
            for epoch in range(self.epoch, self.cfg.epochs):
                self.gm.train()
                t0 = time.perf_counter()
                for x, y in self.batches.epoch(epoch):
                    self.train_step(x, y, epoch)
                    bar.advance(task)
                    if self.step % k == 0:
                        self.t_train += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        rec = self.log_train(epoch)
                        bar.update(task, status=f"epoch {epoch + 1}/{self.cfg.epochs} loss {rec['loss']:.3f} "
                                                f"train {rec['train_top1_ema']:.1f}%")
                    if self.step % self.eval_every == 0:
                        self.t_train += time.perf_counter() - t0
                        self.log_test(epoch)
                        t0 = time.perf_counter()
                self.t_train += time.perf_counter() - t0
                self.epoch = epoch + 1
                self.log_test(epoch)
                self.record({"event": "epoch", "epoch": self.epoch, "step": self.step, "seconds": self.t_train})
                self.save()
        return TrainOutcome(self.epoch, self.step, self.t_train, resumed, self.history)
