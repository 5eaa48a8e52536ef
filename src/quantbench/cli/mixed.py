"""``quantbench mixed``: learn a mixed-precision allocation under average / maximum constraints (seed 004)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import (
    AObserverOpt,
    Device,
    ForceOpt,
    MaxTestOpt,
    OverridesOpt,
    QuietOpt,
    SeedOpt,
    WeightsOpt,
    WidthMultOpt,
    WObserverOpt,
    check_out,
    has_json_keys,
    layer_overrides,
)
from quantbench.config import default_of
from quantbench.errors import ConfigError
from quantbench.mixed.config import MixedConfig
from quantbench.utils.io import atomic_write_json

console = Console(width=None if sys.stdout.isatty() else 160)

MIXED_KEYS = frozenset({"model", "backend", "fp_top1", "quant_top1", "agreement", "allocation", "constraint"})


def is_mixed_result(path: Path) -> bool:
    """Whether ``path`` holds a result ``quantbench mixed --out`` wrote."""
    return has_json_keys(path, MIXED_KEYS)


def _allowed(value: str | None) -> list[int] | None:
    if value is None or value.strip().lower() in ("", "any"):
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--allowed takes comma-separated bit-widths such as 2,4,8 (or 'any'), got {value!r}") \
            from None


def mixed(
    model: Annotated[str, typer.Option(help="model name (see `quantbench models`)")],
    data: Annotated[str, typer.Option(help="dataset: cifar10:PATH, imagefolder:PATH or digits")],
    weights: WeightsOpt = None,
    backend: Annotated[str, typer.Option(help="backend name or a spec .yaml")] = "fbgemm",
    w_avg: Annotated[float | None, typer.Option(help="average weight bits (weighted by parameters)")] = None,
    a_avg: Annotated[float | None, typer.Option(help="average activation bits (weighted by elements)")] = None,
    a_max_fmap: Annotated[float | None, typer.Option(
        help="largest feature map in bytes per image (instead of --a-avg)")] = None,
    fmap_mode: Annotated[str, typer.Option(help="--a-max-fmap: analytic (Obs. 6) or learned")] = "analytic",
    allowed: Annotated[str | None, typer.Option(
        help="allowed bit-widths, e.g. 2,4,8 (default: every integer from --min-bits to --max-bits)")] = None,
    min_bits: Annotated[int, typer.Option(help="smallest bit-width")] = default_of(MixedConfig, "min_bits"),
    max_bits: Annotated[int, typer.Option(help="largest bit-width (the backend's)")] = default_of(
        MixedConfig, "max_bits"),
    first_last: Annotated[str, typer.Option(
        help="in: first/last layer allocated and counted; out: kept at 8 bits, averages over the rest")] = "in",
    labels: Annotated[str, typer.Option(help="true labels, or pseudo (the float model's argmax)")] = "true",
    images: Annotated[int, typer.Option(help="labelled training images")] = default_of(MixedConfig, "images"),
    steps: Annotated[int, typer.Option(help="optimisation steps")] = default_of(MixedConfig, "steps"),
    batch_size: Annotated[int, typer.Option(help="batch size")] = default_of(MixedConfig, "batch_size"),
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = default_of(MixedConfig, "lr"),
    lam: Annotated[float, typer.Option("--lambda", help="weight of the constraint hinge")] = default_of(
        MixedConfig, "lam"),
    estimator: Annotated[str, typer.Option(
        help="ste (rounding, straight-through gradient: the paper's) or dither (one step of uniform noise while "
             "searching)")] = default_of(MixedConfig, "estimator"),
    w_observer: WObserverOpt = default_of(MixedConfig, "w_observer"),
    a_observer: AObserverOpt = default_of(MixedConfig, "a_observer"),
    baselines: Annotated[bool, typer.Option(help="also evaluate uniform precision and the sensitivity greedy")] = True,
    overrides: OverridesOpt = None,
    width_mult: WidthMultOpt = 1.0,
    device: Annotated[Device, typer.Option(help="cpu or cuda")] = Device.cpu,
    seed: SeedOpt = 0,
    max_test: MaxTestOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
    save_overrides: Annotated[Path | None, typer.Option(
        help="write the allocation as per-layer overrides YAML (for ptq --overrides and export)")] = None,
    card: Annotated[Path | None, typer.Option(help="write the quantization card (Markdown for .md, else JSON)")] = None,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
) -> None:
    """Learn per-layer bit-widths under an average or maximum constraint; evaluate them as a PTQ run."""
    from quantbench.mixed.pipeline import run_mixed
    from quantbench.ptq.pipeline import build_context

    check_out(out, force=force, ours=is_mixed_result, kind="quantbench mixed result")
    check_out(save_overrides, "--save-overrides")
    check_out(card, "--card")
    cfg = MixedConfig(
        model=model, weights=weights, data=data, backend=backend, w_avg=w_avg, a_avg=a_avg, a_max_fmap=a_max_fmap,
        fmap_mode=fmap_mode, allowed=_allowed(allowed), min_bits=min_bits, max_bits=max_bits,
        first_last_budget=first_last, labels=labels, images=images, steps=steps, batch_size=batch_size, lr=lr,
        lam=lam, estimator=estimator, w_observer=w_observer, a_observer=a_observer, baselines=baselines,
        overrides=layer_overrides(overrides, None), width_mult=width_mult, device=device.value, seed=seed,
        max_test=max_test,
    )
    cfg.resolved_backend()
    context = build_context(cfg, not quiet)
    result = run_mixed(cfg, progress=not quiet, context=context)
    payload = result.to_dict()
    console.print(_table(payload))
    if out is not None:
        atomic_write_json(out, payload)
        console.print(f"wrote {out}")
    if save_overrides is not None:
        c = payload["constraint"]
        result.allocation.write_yaml(save_overrides, [
            f"quantbench mixed: {cfg.model} on {cfg.backend}, {c['kind']} constraint, w_avg {c['w_avg']}, "
            f"a_avg {c['a_avg']}, a_max_fmap {c['a_max_fmap_bytes']}, allowed {c['allowed']}, first/last "
            f"{c['first_last']}; top-1 {payload['quant_top1']:.2f}", "reproduce (same data and weights):",
            f"  {reproduce_command(cfg, save_overrides)}"], before=cfg.overrides)
        console.print(f"wrote {save_overrides}")
    if card is not None:
        _write_card(card, cfg, result, context)


def reproduce_command(cfg: MixedConfig, overrides: Path) -> str:
    """The ``quantbench ptq`` command that evaluates the saved allocation exactly as this run did."""
    parts = ["quantbench ptq", f"--model {cfg.model}", f"--data {cfg.data}", f"--backend {cfg.backend}",
             f"--w-observer {cfg.w_observer}", f"--a-observer {cfg.a_observer}", f"--calib-size {cfg.calib_size}",
             f"--seed {cfg.seed}", f"--overrides {overrides}"]
    parts += [f"--weights {cfg.weights}"] if cfg.weights else []
    parts += [f"--width-mult {cfg.width_mult:g}"] if cfg.width_mult != 1.0 else []
    parts += [f"--w-bits {cfg.w_bits}"] if cfg.w_bits is not None else []
    parts += [f"--a-bits {cfg.a_bits}"] if cfg.a_bits is not None else []
    parts += [f"--first-last {cfg.first_last}"] if cfg.first_last is not None else []
    parts += [f"--max-test {cfg.max_test}"] if cfg.max_test is not None else []
    return " ".join(parts)


def _write_card(path: Path, cfg: MixedConfig, result, context) -> None:  # type: ignore[no-untyped-def]
    from quantbench.cards import to_markdown, validate_card
    from quantbench.cards.ptq import ptq_run_card
    from quantbench.mixed.card import search_facts
    from quantbench.sweep.identity import code_version
    from quantbench.utils.io import atomic_write_text

    ptq = result.ptq
    doc = ptq_run_card(cfg.model_dump(), cfg.resolved_backend(), ptq.to_dict(), ptq.graph, context.example,
                       code_version(), search=search_facts(result, len(context.bundle.train)))
    validate_card(doc)
    if path.suffix == ".md":
        atomic_write_text(path, to_markdown(doc))
    else:
        atomic_write_json(path, doc)
    console.print(f"wrote {path}")


def _table(p: dict) -> Table:
    t = Table(title=f"Mixed precision: {p['model']} on {p['backend']} ({p['constraint']['kind']} constraint)")
    for col in ("allocation", "top-1", "agreement", "avg W bits", "avg A bits", "max fmap bytes"):
        t.add_column(col)

    def row(name: str, r: dict) -> None:
        f = (lambda v: "-" if v is None else f"{v:.3f}")  # noqa: E731
        t.add_row(name, f"{r['quant_top1']:.2f}", f"{100 * r['agreement']:.2f}", f(r.get("avg_weight_bits")),
                  f(r.get("avg_activation_bits")), f(r.get("max_fmap_bytes")))

    row("learned" if p["search"] else "analytic", p)
    for name, r in p["baselines"].items():
        row(name, r)
    t.caption = f"float top-1 {p['fp_top1']:.2f}; {p['seconds']:.0f} s" + "".join(f"; {n}" for n in p["notes"])
    return t


def register(app: typer.Typer) -> None:
    app.command("mixed")(friendly_errors(mixed))
