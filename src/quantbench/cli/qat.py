"""``quantbench qat``: quantization-aware training from a YAML run file and/or flags (flags win)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from quantbench.cli.errors import err_console, friendly_errors
from quantbench.cli.options import (
    ABitsOpt,
    DataOpt,
    FirstLastOpt,
    MaxTestOpt,
    ModelOpt,
    QuietOpt,
    WBitsOpt,
    WeightsOpt,
    parse_first_last,
)

console = Console(width=None if sys.stdout.isatty() else 160)


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"


class OnDivergence(str, Enum):
    warn = "warn"
    stop = "stop"


@contextmanager
def divergence_warnings_as_lines() -> Iterator[None]:
    """Show a :class:`DivergenceWarning` as one ``warning:`` line on stderr (not Python's file:line form)."""
    from quantbench.qat.diagnostics import DivergenceWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, DivergenceWarning):
                err_console.print(Text("warning: ", style="bold yellow") + Text(str(message)), soft_wrap=True,
                                  highlight=False)
            else:
                shown(message, category, *args, **kwargs)

        warnings.simplefilter("always", DivergenceWarning)
        warnings.showwarning = show
        yield


@friendly_errors
def qat(
    config: Annotated[Path | None, typer.Option("--config", help="YAML run file (flags override it)")] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = None,
    backend: Annotated[str | None, typer.Option(help="backend name or a spec .yaml (default academic)")] = None,
    algorithm: Annotated[str | None, typer.Option(help="lsq, lsq+, pact, dsq, dorefa, apot, qil or fixed")] = None,
    w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs (default 3)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="global batch size (default 128)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: the model family's)")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="weight decay (default: the family's FP recipe)")] = None,
    quantizer_weight_decay: Annotated[float | None, typer.Option(help="weight decay of quantizer parameters")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="label smoothing (default 0)")] = None,
    bn_fold: Annotated[int | None, typer.Option("--bn-fold", help="BN folding strategy 0-4 (default 3)")] = None,
    bn_freeze_step: Annotated[int | None, typer.Option(help="freeze BN statistics after this step")] = None,
    init: Annotated[str | None, typer.Option(help="calibrator (PTQ init, default) or paper")] = None,
    w_observer: Annotated[str | None, typer.Option(help="weight calibrator for the init")] = None,
    a_observer: Annotated[str | None, typer.Option(help="activation calibrator for the init")] = None,
    first_last: FirstLastOpt = None,
    max_train: Annotated[int | None, typer.Option(help="train on the first N training images")] = None,
    max_test: MaxTestOpt = None,
    log_every: Annotated[int | None, typer.Option(help="log train accuracy every K iterations")] = None,
    eval_every: Annotated[int | None, typer.Option(help="test accuracy every K iterations")] = None,
    amp: Annotated[Amp | None, typer.Option(help="none or bf16 (autocast)")] = None,
    fused: Annotated[bool, typer.Option("--fused", help="torch.compile-fused LSQ kernels (C++ CPU / Triton GPU)")]
    = False,
    on_divergence: Annotated[OnDivergence | None, typer.Option(
        help="a finite loss that diverges: warn (default), or stop as on a NaN loss (a test accuracy collapsing "
             "to chance always warns)")]
    = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    out_dir: Annotated[str | None, typer.Option(
        help="checkpoints, log, plots (default qat-out/<model>-<backend>-<algorithm>-w<bits>a<bits>-<config hash>)")]
    = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT_DIR/checkpoint.pt (which must exist)")]
    = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="start anew in an OUT_DIR holding an earlier run (its files are deleted)")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads per process (torch.set_num_threads)")] = None,
    calib_data: Annotated[str | None, typer.Option(help=(
        "images for the PTQ init: real (default), noise[:N] or synthetic:GENERATOR[:N]; training uses --data"))]
    = None,
    quiet: QuietOpt = False,
) -> None:
    """Quantization-aware training (seed 001's unified recipe); prints a table, writes JSON.

    Several processes: ``torchrun --nproc_per_node N -m quantbench.cli.main qat ...`` (NCCL on GPU, gloo on
    CPU; --batch-size is the global batch).
    """
    import torch

    from quantbench.cli.tables import results_table
    from quantbench.qat.config import load_qat_config
    from quantbench.qat.pipeline import run_qat
    from quantbench.utils.io import atomic_write_json

    if threads is not None:
        torch.set_num_threads(threads)
    overrides: dict[str, Any] = {
        "model": model, "weights": weights, "data": data, "backend": backend, "algorithm": algorithm,
        "w_bits": w_bits, "a_bits": a_bits, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "quantizer_weight_decay": quantizer_weight_decay,
        "label_smoothing": label_smoothing, "bn_fold": bn_fold, "bn_freeze_step": bn_freeze_step, "init": init,
        "w_observer": w_observer, "a_observer": a_observer, "first_last": parse_first_last(first_last),
        "max_train": max_train, "max_test": max_test, "log_every": log_every, "eval_every": eval_every,
        "amp": amp.value if amp else None, "fused_kernels": True if fused else None, "device": device,
        "seed": seed, "out_dir": out_dir, "on_divergence": on_divergence.value if on_divergence else None,
        "calib_data": calib_data,
    }
    cfg = load_qat_config(config, overrides)
    with divergence_warnings_as_lines():
        result = run_qat(cfg, resume=resume, progress=not quiet, overwrite=overwrite)
    if result.world_size > 1 and not _is_main():
        return
    console.print(results_table([result], title=f"QAT results ({result.algorithm}, {result.epochs} epochs)"))
    console.print(f"PTQ init top-1 {result.init_top1:.2f} % -> QAT top-1 {result.quant_top1:.2f} % in "
                  f"{result.train_seconds:.1f} s of training; checkpoints, log and plots in {result.out_dir}")
    if out is not None:
        payload = result.to_dict()
        payload["config"] = cfg.model_dump(mode="json")
        atomic_write_json(out, payload)
        console.print(f"wrote {out}")


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def register(app: typer.Typer) -> None:
    """Add ``quantbench qat``."""
    app.command("qat")(qat)
