"""``quantbench coquant``: one network trained over a bit-width set B (seed 002), evaluated at every bit-width."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import DataOpt, MaxTestOpt, ModelOpt, QuietOpt, WeightsOpt

console = Console(width=None if sys.stdout.isatty() else 160)


def _bits(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(b) for b in text.replace(" ", "").split(",") if b]
    except ValueError:
        raise typer.BadParameter(f"give bit-widths as a comma-separated list such as 8,4,2, got {text!r}") from None


@friendly_errors
def coquant(
    config: Annotated[Path | None, typer.Option("--config", help="YAML run file (flags override it)")] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    data: DataOpt = None,
    bits: Annotated[str | None, typer.Option(help="the trained set B, e.g. 8,4,2 (default)")] = None,
    eval_bits: Annotated[str | None, typer.Option(help="bit-widths to evaluate (default max(B)..min(B)); unseen "
                                                       "ones are zero-shot after BN calibration")] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs (default 3)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size (default 128)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: the model family's QAT rate)")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine (default) or multistep")] = None,
    milestones: Annotated[str | None, typer.Option(help="multistep epochs, e.g. 150,225,270")] = None,
    p1: Annotated[float | None, typer.Option(help="initial keep-probability of the first block (0.9)")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="lambda of the teacher score (0.001)")] = None,
    teacher: Annotated[str | None, typer.Option(help="dynamic (seed 002, default), recursive (Any-Precision) or "
                                                     "none")] = None,
    distance: Annotated[str | None, typer.Option(help="teacher distance: weights (default) or kl")] = None,
    ramp_epochs: Annotated[float | None, typer.Option(help="ramp the lower bit-widths' losses in over these epochs "
                                                           "(a deviation from Algorithm 1; default 0: off)")] = None,
    bn_calib_size: Annotated[int | None, typer.Option(help="images calibrating an unseen bit's BN (256)")] = None,
    bn_recalibrate: Annotated[bool, typer.Option("--bn-recalibrate", help="re-estimate the trained bits' BN "
                                                                          "statistics too before evaluating")] = False,
    centred_weights: Annotated[bool, typer.Option(
        "--centred-weights", help="AdaBits' centred (modified) DoReFa weight levels, seed 002 Table 5's option "
                                  "(not exportable: no level at zero)")] = False,
    max_train: Annotated[int | None, typer.Option(help="train on the first N training images")] = None,
    max_test: MaxTestOpt = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    out_dir: Annotated[str | None, typer.Option(help="checkpoints, log and result.json")] = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT_DIR/checkpoint.pt")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start anew in an OUT_DIR holding a run")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads (torch.set_num_threads)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train one network jointly over B (seed 002 Algorithm 1) and evaluate it at every bit-width; writes JSON."""
    import torch

    from quantbench.coquant.config import CoQuantConfig
    from quantbench.coquant.pipeline import run_coquant
    from quantbench.qat.config import load_qat_config
    from quantbench.utils.io import atomic_write_json

    if threads is not None:
        torch.set_num_threads(threads)
    overrides: dict[str, Any] = {
        "model": model, "weights": weights, "data": data, "bits": _bits(bits), "eval_bits": _bits(eval_bits),
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "schedule": schedule, "milestones": _bits(milestones),
        "p1": p1, "lam": lam, "teacher": teacher, "distance": distance, "ramp_epochs": ramp_epochs,
        "bn_calib_size": bn_calib_size,
        "bn_recalibrate": True if bn_recalibrate else None,
        "max_train": max_train, "max_test": max_test, "device": device, "seed": seed, "out_dir": out_dir,
    }
    cfg = load_qat_config(config, overrides, cls=CoQuantConfig)
    if centred_weights:  # on top of the options a --config file gives
        cfg = CoQuantConfig.model_validate({**cfg.model_dump(), "algorithm_options": {
            **cfg.algorithm_options, "centred_weights": True}}).check()
    result = run_coquant(cfg, resume=resume, progress=not quiet, overwrite=overwrite)  # type: ignore[arg-type]
    t = Table(title=f"CoQuant {cfg.model}: B = {{{', '.join(map(str, result.trained_bits))}}}, {result.epochs} "
                    f"epochs, teacher {result.teacher}; FP32 {result.fp_top1:.2f} %")
    for c in ("bits", "top-1", "agreement", "zero-shot", "BN images"):
        t.add_column(c, justify="right")
    for r in result.results:
        t.add_row(str(r.bits), f"{r.quant_top1:.2f}", f"{100 * r.agreement:.1f} %", "yes" if r.zero_shot else "",
                  str(r.bn_calib_images or ""))
    console.print(t)
    console.print(f"{result.train_seconds:.1f} s of training on {result.train_images} images; run folder "
                  f"{result.out_dir}")
    if out is not None:
        atomic_write_json(out, {**result.to_dict(), "config": cfg.model_dump(mode="json")})
        console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add ``quantbench coquant``."""
    app.command("coquant")(coquant)
