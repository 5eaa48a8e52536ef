"""``quantbench`` command line: ptq, demo and listings of backends, models and observers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from quantbench.backends import BackendSpec, backend_names, load_backend
from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import (
    ABitsOpt,
    AObserverOpt,
    BnCalibOpt,
    CalibDataOpt,
    CalibSizeOpt,
    Device,
    FirstLastOpt,
    ForceOpt,
    LayerBitsOpt,
    MaxTestOpt,
    OverridesOpt,
    QuietOpt,
    ResidualOpt,
    SeedOpt,
    SkipOpt,
    WBitsOpt,
    WeightsOpt,
    WidthMultOpt,
    WObserverOpt,
    check_out,
    has_json_keys,
    layer_overrides,
    parse_first_last,
    policy,
)
from quantbench.cli.tables import backends_table, results_table
from quantbench.config import PTQConfig, default_of
from quantbench.recon.config import CPU_ITERS, GPU_ITERS, ReconOptions
from quantbench.utils.io import atomic_write_json

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Backend-faithful, fast and honestly comparable quantization of CNNs.")
console = Console(width=None if sys.stdout.isatty() else 160)


@app.command()
@friendly_errors
def ptq(
    model: Annotated[str | None, typer.Option(help="model name (see `quantbench models`)")] = None,
    data: Annotated[str | None, typer.Option(help="dataset: cifar10:PATH, imagefolder:PATH or digits")] = None,
    weights: WeightsOpt = None,
    backend: Annotated[str, typer.Option(help="backend name or a spec .yaml")] = "academic",
    w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None,
    w_observer: WObserverOpt = PTQConfig.model_fields["w_observer"].default,
    a_observer: AObserverOpt = PTQConfig.model_fields["a_observer"].default,
    calib_size: CalibSizeOpt = default_of(PTQConfig, "calib_size"),
    bn_calib: BnCalibOpt = False,
    bn_calib_augment: Annotated[bool, typer.Option(
        "--bn-calib-augment/--no-bn-calib-augment",
        help="BN re-calibration on training images under the training augmentation (the distribution BN was "
             "trained on)")] = True,
    first_last: FirstLastOpt = None,
    residual: ResidualOpt = None,
    skip: SkipOpt = None,
    layer_bits: LayerBitsOpt = None,
    overrides: OverridesOpt = None,
    width_mult: WidthMultOpt = 1.0,
    method: Annotated[str, typer.Option(
        help="weight rounding: nearest (calibration only), or reconstruct with adaround, brecq or qdrop")
    ] = default_of(PTQConfig, "method"),
    iters: Annotated[int | None, typer.Option(
        help=f"reconstruction iterations per unit (default: {CPU_ITERS} on cpu, {GPU_ITERS} on cuda)")] = None,
    recon_size: Annotated[int, typer.Option(help="training images for reconstruction")] = default_of(
        ReconOptions, "recon_size"),
    drop_prob: Annotated[float, typer.Option(
        help="qdrop: probability that an activation quantizer returns its float input (1 - the reference's prob)")
    ] = default_of(ReconOptions, "drop_prob"),
    calib_data: CalibDataOpt = default_of(PTQConfig, "calib_data"),
    device: Annotated[Device, typer.Option(help="cpu or cuda")] = Device.cpu,
    seed: SeedOpt = 0,
    max_test: MaxTestOpt = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
    card: Annotated[Path | None, typer.Option(
        help="write the quantization card here (Markdown for .md, else JSON)")] = None,
    list_quantizers: Annotated[bool, typer.Option(
        "--list-quantizers", help="print every layer's bits and every quantizer")] = False,
    quiet: QuietOpt = False,
    force: ForceOpt = False,
    from_: Annotated[Path | None, typer.Option(
        "--from", help="evaluate a `quantbench coquant` run (its folder or final.pt) at --bits instead of "
                       "calibrating; an unseen bit-width is BN-calibrated first (zero-shot)")] = None,
    bits: Annotated[int | None, typer.Option(help="with --from: the bit-width to evaluate (2-8)")] = None,
) -> None:
    """Post-training quantization of one model for one backend; prints a table, writes JSON."""
    from quantbench.ptq.pipeline import build_context, run_ptq

    check_out(out, force=force, ours=is_ptq_result, kind="quantbench ptq result")  # before any work
    if from_ is not None or bits is not None:
        _ptq_from_coquant(from_, bits, model, data, weights, device.value, max_test, out, card, quiet)
        return
    if model is None or data is None:
        raise typer.BadParameter("give --model and --data (or --from a `quantbench coquant` run with --bits)")

    cfg = PTQConfig(
        model=model, weights=weights, data=data, backend=backend, w_bits=w_bits, a_bits=a_bits,
        w_observer=w_observer, a_observer=a_observer, calib_size=calib_size, bn_calib=bn_calib,
        bn_calib_augment=bn_calib_augment,
        first_last=parse_first_last(first_last), residual=policy(residual), skip=policy(skip),
        width_mult=width_mult, device=device.value, seed=seed,
        max_test=max_test, overrides=layer_overrides(overrides, layer_bits), method=method,
        recon=ReconOptions(iters=iters, recon_size=recon_size, drop_prob=drop_prob), calib_data=calib_data,
    )
    spec = cfg.resolved_backend()  # validate overrides before any work
    context = build_context(cfg, not quiet)
    result = run_ptq(cfg, progress=not quiet, context=context, keep_quantizers=list_quantizers or card is not None)
    gm = result.graph
    console.print(results_table([result]))
    if list_quantizers:
        _print_layers(result.layers)
        _print_quantizers(result.extra.get("quantizers", []))
    if out is not None:
        payload = result.to_dict()
        payload["config"] = cfg.model_dump()
        atomic_write_json(out, payload)
        console.print(f"wrote {out}")
    if card is not None:
        _write_card(card, cfg.model_dump(), spec, result.to_dict(), gm, context.example)


def _ptq_from_coquant(run: Path | None, bits: int | None, model: str | None, data: str | None, weights: str | None,
                      device: str, max_test: int | None, out: Path | None, card: Path | None, quiet: bool) -> None:
    """``quantbench ptq --from RUN --bits b``: a CoQuant network at one bit-width (BN-calibrated when unseen)."""
    import hashlib
    import json

    from quantbench.coquant.card import coquant_card
    from quantbench.coquant.evaluate import evaluate_run
    from quantbench.coquant.load import is_coquant_checkpoint
    from quantbench.sweep.identity import code_version

    if run is None or bits is None:
        raise typer.BadParameter("--from and --bits go together: --from a `quantbench coquant` run folder and "
                                 "--bits the bit-width to evaluate")
    given = [name for name, v in (("--model", model), ("--data", data), ("--weights", weights)) if v is not None]
    if given:
        raise typer.BadParameter(f"--from takes the model, weights and data from the run: leave out "
                                 f"{', '.join(given)}")
    if not (run.suffix == ".pt" or (run / "final.pt").is_file()) or not is_coquant_checkpoint(run):
        raise typer.BadParameter(f"{run} is not a finished `quantbench coquant` run (its folder holds final.pt "
                                 "with the trained bit-widths); `ptq --from` evaluates CoQuant runs only")
    ev = evaluate_run(run, bits, device, not quiet, max_test)
    r = ev.result
    t = Table(title=f"CoQuant run {run} at {bits} bits (trained B = {{{', '.join(map(str, ev.trained_bits))}}})")
    for c in ("bits", "FP top-1", "quant top-1", "agreement", "zero-shot", "BN images"):
        t.add_column(c, justify="right")
    t.add_row(str(bits), f"{ev.fp_top1:.2f}", f"{r.quant_top1:.2f}", f"{100 * r.agreement:.1f} %",
              "yes" if r.zero_shot else "", str(r.bn_calib_images or ""))
    console.print(t)
    payload = {"model": ev.config.model, "backend": ev.config.backend, "w_bits": bits, "a_bits": bits,
               "from": str(run), **ev.to_dict()}
    if out is not None:
        atomic_write_json(out, payload)
        console.print(f"wrote {out}")
    if card is not None:
        from quantbench.cards import to_markdown
        from quantbench.utils.io import atomic_write_text

        run_id = hashlib.sha256(json.dumps({"from": str(run.resolve()), "bits": bits}).encode()).hexdigest()[:16]
        trained = json.loads(((run if run.is_dir() else run.parent) / "result.json").read_text())
        doc = coquant_card(ev, {"run_id": run_id, "sweep": "(quantbench ptq --from)", "method_label":
                                f"coquant at {bits} bits", "code_version": code_version()},
                           int(trained["train_images"]), float(trained["train_seconds"]), str(run))
        atomic_write_text(card, to_markdown(doc)) if card.suffix == ".md" else atomic_write_json(card, doc)
        console.print(f"wrote {card}")


def _write_card(path: Path, config: dict, spec: BackendSpec, result: dict, gm: Any, example: Any) -> None:
    from quantbench.cards import to_markdown, validate_card
    from quantbench.cards.ptq import ptq_run_card
    from quantbench.sweep.identity import code_version
    from quantbench.utils.io import atomic_write_text

    doc = ptq_run_card(config, spec, result, gm, example, code_version())
    validate_card(doc)
    if path.suffix == ".md":
        atomic_write_text(path, to_markdown(doc))
    else:
        atomic_write_json(path, doc)
    console.print(f"wrote {path}")


def _bits(b: int | None) -> str:
    return "fp32" if b is None else str(b)


def _print_layers(rows: list[dict]) -> None:
    t = Table(title="Layers (after per-layer overrides)")
    for col in ("layer", "type", "weights", "input", "overrides", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["type"], f"{_bits(r['w_bits'])} ({r['w_scheme']})",
                  f"{_bits(r['a_bits'])} ({r['a_scheme']})", ", ".join(r["overrides"]) or "-", r["note"] or "")
    console.print(t)


PTQ_RESULT_KEYS = frozenset({"model", "backend", "w_bits", "a_bits", "fp_top1", "quant_top1", "agreement"})


def is_ptq_result(path: Path) -> bool:
    """Whether ``path`` holds a result ``quantbench ptq --out`` wrote (a JSON object with its keys)."""
    return has_json_keys(path, PTQ_RESULT_KEYS)


def _print_quantizers(rows: list[dict]) -> None:
    t = Table(title="Quantizers")
    for col in ("name", "role", "scheme", "observer", "range", "scale[0]", "zp[0]", "note"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["role"], r["scheme"], r["observer"], f"[{r['qmin']}, {r['qmax']}]",
                  f"{r['scale'][0]:.4g}" if r["scale"] else "-", str(r["zero_point"][0]) if r["zero_point"] else "-",
                  r.get("note", ""))
    console.print(t)


@app.command()
@friendly_errors
def backends(as_json: Annotated[bool, typer.Option("--json", help="print the specs as JSON")] = False) -> None:
    """The table of backend specs."""
    specs = [load_backend(n) for n in backend_names()]
    if as_json:
        console.print_json(json.dumps([s.model_dump() for s in specs]))
    else:
        console.print(backends_table(specs))


@app.command()
@friendly_errors
def models(
    timm: Annotated[str | None, typer.Option("--timm", help="list timm's models matching this glob instead "
                                                              "(e.g. 'resnet*'; '' for all); use them as timm:NAME")]
    = None,
) -> None:
    """Registered models, or timm's (any of them works as --model timm:NAME)."""
    from quantbench.models import MODELS, get_entry

    if timm is not None:
        from quantbench.models.timm_models import list_timm

        names = [f"timm:{n}" for n in list_timm(timm)]
        title = f"timm models matching {timm!r}: {len(names)} (random init unless --weights; nothing downloaded)"
    else:
        names, title = MODELS.names(), "Models (also any timm model as timm:NAME: quantbench models --timm GLOB)"
    t = Table(title=title)
    for col in ("name", "family", "input", "classes", "description"):
        t.add_column(col)
    for name in names:
        e = get_entry(name)
        t.add_row(name, e.family, "x".join(map(str, e.input_size)), str(e.num_classes), e.description)
    console.print(t)


@app.command()
def observers() -> None:
    """Registered calibration algorithms."""
    from quantbench.observers import OBSERVERS

    t = Table(title="Observers (calibration algorithms)")
    t.add_column("name")
    t.add_column("description")
    for name in OBSERVERS.names():
        doc = (OBSERVERS.get(name).__doc__ or "").strip().splitlines()
        t.add_row(name, doc[0] if doc else "")
    console.print(t)


@app.command()
@friendly_errors
def demo(
    out: Annotated[Path, typer.Option(help="output folder")] = Path("quantbench-out"),
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bars")] = False,
) -> None:
    """Train the digits CNN (cached), PTQ it on every backend and calibrator at W8A8/W4A8/W4A4."""
    from quantbench.cli.demo import run_demo

    run_demo(out, progress=not quiet, console=console)


def _register_plugins() -> None:
    """Modules of this package that define ``register(app)`` add their own commands."""
    import importlib
    import pkgutil

    import quantbench.cli as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name in ("main", "errors", "tables", "demo"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        if hasattr(module, "register"):
            module.register(app)


_register_plugins()

if __name__ == "__main__":
    app()
