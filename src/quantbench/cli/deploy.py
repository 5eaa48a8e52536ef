"""Deployment commands: ``export`` (QDQ ONNX + backend artefacts), ``verify`` (ONNX Runtime vs simulation),
``latency`` (runtimes side by side) and ``size`` (model size and inference memory)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from quantbench.backends.overrides import LayerOverride
from quantbench.cli.errors import friendly_errors
from quantbench.cli.options import (
    ABitsOpt,
    AObserverOpt,
    BnCalibOpt,
    CalibSizeOpt,
    DataOpt,
    FirstLastOpt,
    LayerBitsOpt,
    MaxTestOpt,
    ModelOpt,
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
    layer_overrides,
    parse_first_last,
    parse_layer_bits,
    policy,
)
from quantbench.config import PTQConfig, default_of
from quantbench.errors import ConfigError
from quantbench.utils.io import atomic_write_json

PTQ_DEFAULTS = PTQConfig.model_fields  # export calibrates exactly as `quantbench ptq` does
console = Console(width=None if sys.stdout.isatty() else 160)

def _artefact_names(value: str) -> list[str] | None:
    if value == "auto":
        return None
    if value == "none":
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _qdq_pairs(acts: list[dict[str, Any]]) -> str:
    on_codes = sum(1 for a in acts if a.get("quantize", "") is None)
    pairs = f"{len(acts) - on_codes}"
    return pairs + (f" (+{on_codes} re-quantizing copies dropped: their Slice/Pad/Flatten run on uint8 codes)"
                    if on_codes else "")


def _overflow_row(risk: dict[str, Any]) -> str:
    from quantbench.deploy.hazards import cpu_features

    if not risk["at_risk"]:
        return "none"
    affected = "affected: use --reduce-range" if cpu_features()["int16_overflow_possible"] else "not affected"
    return f"{len(risk['layers'])} layer(s); this CPU ({cpu_features()['cpu']}) is {affected}"


def _kv(rows: list[tuple[str, Any]], title: str) -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("what")
    t.add_column("value")
    for k, v in rows:
        t.add_row(Text(k), Text(str(v)))  # plain text: values hold ranges like [-127, 127]
    return t


# ------------------------------------------------------------------------------------------------ export
def export(
    out: Annotated[Path, typer.Option(help="ONNX file to write")],
    model: ModelOpt = None,
    data: DataOpt = None,
    weights: WeightsOpt = None,
    backend: Annotated[str, typer.Option(help="backend name or a spec .yaml")] = "onnxruntime",
    w_bits: WBitsOpt = None,
    a_bits: ABitsOpt = None,
    w_observer: WObserverOpt = PTQ_DEFAULTS["w_observer"].default,
    a_observer: AObserverOpt = PTQ_DEFAULTS["a_observer"].default,
    calib_size: CalibSizeOpt = default_of(PTQConfig, "calib_size"),
    bn_calib: BnCalibOpt = False,
    first_last: FirstLastOpt = None,
    residual: ResidualOpt = None,
    skip: SkipOpt = None,
    layer_bits: LayerBitsOpt = None,
    overrides: OverridesOpt = None,
    width_mult: WidthMultOpt = 1.0,
    seed: SeedOpt = 0,
    reduce_range: Annotated[bool, typer.Option(
        "--reduce-range", help="7-bit weights: no int16 overflow in ONNX Runtime on AVX2 without VNNI")] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset, 13-18 (per-channel QDQ needs >= 13)")] = 13,
    artefacts: Annotated[str, typer.Option(
        help="backend artefacts: auto (the backend's), none, or tensorrt_clip_ranges,snpe_encodings")] = "auto",
    from_: Annotated[Path | None, typer.Option(
        "--from", help="export a `quantbench qat` run (its folder or final.pt) or a saved simulation "
                       "(*.qb.safetensors) instead of calibrating")] = None,
    bits: Annotated[int | None, typer.Option(help="with --from a `quantbench coquant` run: the bit-width to export")]
    = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a PTQ- or QAT-quantized model to ONNX (QuantizeLinear/DequantizeLinear, BN folded) with the
    simulation checkpoint and the backend's artefacts beside it."""
    from quantbench.deploy.checkpoint import load_simulation, simulation_bytes, simulation_path
    from quantbench.deploy.export import check_opset, export_onnx
    from quantbench.deploy.lower import check_exportable, check_spec
    from quantbench.deploy.pipeline import calibrated_model, resolved_spec
    from quantbench.utils.io import AtomicGroup

    check_out(out)  # before any work
    check_out(simulation_path(out), "the simulation beside --out")
    check_opset(opset)
    if from_ is not None:
        import torch

        if from_.suffix == ".pt" or (from_ / "final.pt").is_file():  # a `quantbench qat` or `coquant` run
            from quantbench.coquant.load import coquant_config_of, is_coquant_checkpoint, load_coquant_at
            from quantbench.deploy.errors import ExportError
            from quantbench.deploy.lower import bake_for_export
            from quantbench.qat.load import load_qat_run

            if is_coquant_checkpoint(from_):
                spec = coquant_config_of(from_).resolved_backend()  # refused at any bit-width, seen or not
                if not spec.deployable:
                    raise ExportError(
                        f"{from_} is a CoQuant run trained in the {spec.name!r} setting, which no integer runtime "
                        f"executes ({spec.not_deployable_because.strip()}); CoQuant keeps BatchNorm unfolded "
                        "because each bit-width has its own BN, so no hardware-backend export of it exists yet")
                gm_qat, config = load_coquant_at(from_, bits)
            elif bits is not None:
                raise typer.BadParameter("--bits picks the bit-width of a `quantbench coquant` run; this run has one")
            else:
                gm_qat, config = load_qat_run(from_)
            gm = bake_for_export(gm_qat)
        else:
            gm, config = load_simulation(from_)
            config.pop("_path", None)
        example = torch.zeros(1, *config["input_size"])
    else:
        if model is None or data is None:
            raise typer.BadParameter("give --model and --data (or --from a saved simulation)")
        cfg = PTQConfig(model=model, weights=weights, data=data, backend=backend, w_bits=w_bits, a_bits=a_bits,
                        w_observer=w_observer, a_observer=a_observer, calib_size=calib_size, bn_calib=bn_calib,
                        first_last=parse_first_last(first_last), residual=policy(residual), skip=policy(skip),
                        width_mult=width_mult, seed=seed, overrides=layer_overrides(overrides, layer_bits))
        check_spec(resolved_spec(cfg, reduce_range))  # refuse before any calibration work
        cal = calibrated_model(cfg, reduce_range, progress=not quiet)
        gm, config, example = cal.gm, cal.config, cal.example
    check_exportable(gm)
    sim_file = simulation_path(out)
    sim_bytes = simulation_bytes(gm, config)
    with AtomicGroup() as group:  # the simulation, the ONNX and the artefacts appear together or not at all
        group.write(sim_file, lambda f: f.write(sim_bytes))
        result = export_onnx(gm, example, out, extra={"model": config, "simulation": {
            "file": sim_file.name, "sha256": hashlib.sha256(sim_bytes).hexdigest()}}, opset=opset,
            artefacts=_artefact_names(artefacts), group=group)
    rec = result.record
    risk = rec["int16_overflow_risk"]
    be = rec["backend"]
    kernels = ", ".join(f"{k} x{v}" for k, v in _count(rec["integer_kernels"]).items()) or "none"
    rows = [
        ("backend", f"{be['name']} (W{be['weight']['bits']}A{be['activation']['bits']}"
                    f"{', reduce_range' if be['reduce_range'] else ''})"),
        ("activation QDQ pairs", _qdq_pairs(rec["activations"])),
        ("weights", f"{len(rec['weights'])} ({', '.join(sorted({w['dtype'] for w in rec['weights']}))}, "
                    f"{'per-channel' if any(w['per_channel'] for w in rec['weights']) else 'per-tensor'})"),
        ("int32 biases", len(rec["biases"])),
        ("narrow ranges", len(rec["narrow_ranges"]) or "none"),
        ("expected ORT int8 kernels", kernels),
        ("int16 overflow risk (AVX2, no VNNI)", _overflow_row(risk)),
        ("opset / exporter", f"{rec['exporter']['opset']} / {rec['exporter']['name']}"),
        ("ONNX", f"{result.path} ({result.path.stat().st_size / 1e6:.2f} MB)"),
        ("simulation", sim_file),
        *[(f"artefact {k}", v) for k, v in result.artefacts.items()],
    ]
    console.print(_kv(rows, "Export"))
    for note in rec["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)


def _count(kernels: dict[str, str]) -> dict[str, int]:
    from collections import Counter

    return dict(sorted(Counter(kernels.values()).items()))


# ------------------------------------------------------------------------------------------------ verify
def verify(
    onnx: Annotated[Path, typer.Option(help="ONNX file written by `quantbench export`")],
    data: Annotated[str, typer.Option(help="dataset: cifar10:PATH, imagefolder:PATH or digits")],
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
    sim: Annotated[Path | None, typer.Option(help="simulation checkpoint (default: the one named in the ONNX)")] = None,
    max_test: MaxTestOpt = None,
    batch_size: Annotated[int, typer.Option(help="images per batch")] = 256,
    x64_quant_precision: Annotated[bool, typer.Option(
        "--x64-quant-precision", help="ORT session.x64quantprecision=1 (exact u8u8 kernels on AVX2)")] = False,
    threads: Annotated[int | None, typer.Option(help="runtime CPU threads (default: all cores)")] = None,
    runtime: Annotated[str, typer.Option(help="real runtime to run the export in: onnxruntime or openvino "
                                              "(optional extra)")] = "onnxruntime",
    quiet: QuietOpt = False,
) -> None:
    """Run the exported model in a real runtime (ONNX Runtime's CPU provider by default) and compare it with the
    simulation on the same images."""
    import torch

    from quantbench.data import load_data, make_loader
    from quantbench.deploy.checkpoint import load_simulation
    from quantbench.deploy.metadata import load_onnx, read_metadata
    from quantbench.deploy.runtimes import get_runtime
    from quantbench.deploy.verify import check_data, check_simulation_hash, verify_onnx
    from quantbench.errors import ConfigError

    check_out(out)  # before any work
    get_runtime(runtime).require()
    record = read_metadata(load_onnx(str(onnx)), str(onnx))
    sim_path = sim or onnx.with_name(record.get("simulation", {}).get("file", ""))
    if not sim_path.is_file():
        raise ConfigError(f"the simulation checkpoint {sim_path} is missing: keep it beside the ONNX (export writes "
                          "it) or pass --sim PATH")
    check_simulation_hash(record, sim_path)
    gm, config = load_simulation(sim_path)
    bundle = load_data(data, config["mean"], config["std"], config["input_size"])
    check_data(record, config, bundle, data)
    test = bundle.test
    if max_test is not None and max_test < len(test):  # type: ignore[arg-type]
        test = torch.utils.data.Subset(test, range(max_test))
    res = verify_onnx(onnx, gm, make_loader(test, batch_size), x64_quant_precision, threads, progress=not quiet,
                      runtime=runtime)
    who = "ORT" if runtime == "onnxruntime" else runtime
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    delta = None if res.sim_top1 is None else res.real_top1 - res.sim_top1  # type: ignore[operator]
    rows = [
        ("backend", res.backend), ("images", res.n), ("sim top-1", fmt(res.sim_top1)),
        (f"{who} top-1", fmt(res.real_top1)), (f"Δ ({who} - sim)", fmt(delta)),
        ("agreement", f"{100 * res.agreement:.2f} %"),
        ("max |Δ logit|", f"{res.max_abs_logit_diff:.4g}"), ("mean |Δ logit|", f"{res.mean_abs_logit_diff:.4g}"),
        (f"integer kernels (after {who}'s optimization)", ", ".join(f"{k} x{v}" for k, v in res.int8_kernels.items())),
        ("status", res.status),
        ("session", f"onnxruntime {res.onnxruntime}, x64quantprecision={int(res.x64_quant_precision)}"
         if runtime == "onnxruntime" else f"{runtime} {res.runtime_version}"),
        ("CPU", f"{res.cpu.get('cpu')} (AVX2 {res.cpu.get('avx2')}, VNNI {res.cpu.get('vnni')})"),
    ]
    console.print(_kv(rows, f"Verify {onnx.name}: {runtime} vs simulation"))
    if res.float_ops:
        t = Table(title=f"Ops {runtime} ran in float (the model still ran)")
        for c in ("op", "node", "why"):
            t.add_column(c)
        for f in res.float_ops:
            t.add_row(f["op"], f["node"], f["reason"])
        console.print(t)
    for note in res.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    if out is not None:
        atomic_write_json(out, res.to_dict())
        console.print(f"wrote {out}")


# ----------------------------------------------------------------------------------------------- latency
def _ints(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} takes comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise typer.BadParameter(f"{what} needs positive integers, got {value!r}")
    return out


def _input_size(model: str, value: str | None) -> tuple[int, ...]:
    from quantbench.models import get_entry

    return tuple(_ints(value, "--input-size")) if value else tuple(get_entry(model).input_size)


def latency_table(report: Any) -> Table:
    """Seed 001 Table 9 layout: median ms per runtime and batch, speed-up over the runtime it is compared to."""
    t = Table(title=f"Latency (ms, median of {report.repeats}) - {report.model} "
                    f"{'x'.join(map(str, report.input_size))}, {report.threads} thread(s), {report.environment['cpu']}")
    for c in ("batch", "runtime", "latency (speed-up)", "vs"):
        t.add_column(c, justify="right" if c != "runtime" else "left")
    for r in report.rows:
        if r.median_ms is None:
            t.add_row(str(r.batch), r.label, "-", f"skipped: {r.skipped}" if r.skipped else "")
            continue
        ratio = "" if r.speedup is None else f" ({r.speedup:.2f})"
        color = "" if r.speedup is None else ("green" if r.speedup >= 1 else "red")
        cell = f"{r.median_ms:.3f}{ratio}" if not color else f"[{color}]{r.median_ms:.3f}{ratio}[/{color}]"
        t.add_row(str(r.batch), r.label, cell, r.baseline or "")
    return t


def latency(
    model: Annotated[str, typer.Option(help="model name (see `quantbench models`)")],
    weights: WeightsOpt = None,
    data: Annotated[str | None, typer.Option(help="calibration images for the int8 runtimes (default: random)")] = None,
    width_mult: WidthMultOpt = 1.0,
    input_size: Annotated[str | None, typer.Option(help="C,H,W (default: the model's)")] = None,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8",
    runtimes: Annotated[str | None, typer.Option(help="comma-separated runtimes (default: all)")] = None,
    repeats: Annotated[int, typer.Option(help="timed runs per measurement")] = 30,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 5,
    threads: Annotated[int | None, typer.Option(help="threads for PyTorch and ORT (default: all cores)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
    png: Annotated[Path | None, typer.Option(help="write a bar chart here")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Median latency at batch 1 and 8 on every runtime available here (seed 001 Table 9 layout)."""
    import torch

    from quantbench.deploy.latency import DEFAULT_RUNTIMES, RUNTIMES, bar_chart, make_context, measure
    from quantbench.models import build_model, get_entry

    check_out(out)  # before any work
    check_out(png, "--png")
    size = _input_size(model, input_size)
    names = [r.strip() for r in runtimes.split(",")] if runtimes else list(DEFAULT_RUNTIMES)
    for n in names:
        RUNTIMES.get(n)  # unknown names list the valid ones before any work
    calib = None
    entry = get_entry(model)
    if data is not None:
        from quantbench.data import calibration_subset, load_data

        calib_set = calibration_subset(load_data(data, entry.mean, entry.std, size), 32, 0)
        calib = torch.stack([calib_set[i][0] for i in range(len(calib_set))])
    net = build_model(model, weights, width_mult)
    with make_context(net, size, calib, threads) as ctx:  # removes its temp folder
        report = measure(ctx, names, _ints(batch_sizes, "--batch-sizes"), repeats, warmup, not quiet, model)
    console.print(latency_table(report))
    if out is not None:
        atomic_write_json(out, report.to_dict())
        console.print(f"wrote {out}")
    if png is not None:
        bar_chart(report, png)
        console.print(f"wrote {png}")


# -------------------------------------------------------------------------------------------------- size
SIZE_LAYER_BITS_HELP = ("per-layer weight bits: PATTERN=BITS,... (PATTERN: a layer name or glob, type:Conv2d, "
                        "depthwise; BITS or fp) or a .json file {name: bits}")


def _layer_bits(value: str | None, net: nn.Module) -> dict[str, int]:
    """``--layer-bits`` of ``size``: ``PATTERN=BITS,...`` (weight bits; ``fp`` = 32) or a .json file of
    ``{name: bits}``; patterns are matched like ptq's (globs, type:NAME, depthwise), later items win."""
    if not value:
        return {}
    p = Path(value)
    if p.suffix == ".json" and p.is_file():
        import json

        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--layer-bits {p}: cannot read the JSON file: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--layer-bits {p} must hold a JSON object {{layer name: bits}}")
        items = [f"{k}={v}" for k, v in data.items()]
    else:
        items = [i for i in value.split(",") if i.strip()]
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    out: dict[str, int] = {}
    for item in items:
        lb = parse_layer_bits(item)
        if lb.a_bits is not None:
            raise ConfigError(f"--layer-bits of size takes weight bits only (PATTERN=BITS or PATTERN=fp), got {item!r}")
        bits = 32 if lb.keep_float else lb.w_bits or 0
        if bits > 32:
            raise ConfigError(f"--layer-bits {item!r}: bits must be in 1..32")
        probe = LayerOverride(match=lb.pattern, w_bits=min(bits, 16))
        names = [n for n, m in layers if probe.matches(n, m)]
        if not names:
            raise ConfigError(f"--layer-bits pattern {lb.pattern!r} matches no conv/linear layer; layers are "
                              f"e.g. {[n for n, _ in layers][:5]}")
        out.update(dict.fromkeys(names, bits))
    return out


def size(
    model: Annotated[str, typer.Option(help="model name (see `quantbench models`)")],
    w_bits: Annotated[int, typer.Option(help="weight bits")] = 8,
    a_bits: Annotated[int, typer.Option(help="activation bits")] = 8,
    first_last: Annotated[int | None, typer.Option(help="bits of the first and last layer (default: --w-bits)")] = None,
    layer_bits: Annotated[str | None, typer.Option(help=SIZE_LAYER_BITS_HELP)] = None,
    width_mult: WidthMultOpt = 1.0,
    input_size: Annotated[str | None, typer.Option(help="C,H,W (default: the model's)")] = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
) -> None:
    """Model size (C_size, packed weight bytes) and single-image inference memory, with and without an
    8-bit first/last layer (seed 003 eq. 6 and Appendix F)."""
    from quantbench.models import build_model
    from quantbench.size import model_size

    check_out(out)  # before any work
    shape = _input_size(model, input_size)
    net = build_model(model, None, width_mult)
    bits = _layer_bits(layer_bits, net)
    given = first_last if first_last is not None else w_bits
    other = 8 if given != 8 else w_bits  # with and without an 8-bit first/last layer
    fl_variants = [(f"first/last {fl}-bit", fl) for fl in dict.fromkeys((given, other))]
    reports = [(label, model_size(net, shape, w_bits, a_bits, fl, bits, model)) for label, fl in fl_variants]
    t = Table(title=f"Size of {model} ({'x'.join(map(str, shape))}), W{w_bits}A{a_bits}")
    t.add_column("quantity")
    for label, _ in reports:
        t.add_column(label, justify="right")
    def mb(v: float) -> str:
        return f"{v / 1e6:.3f} MB"

    def fmap(r: Any, n: int) -> str:
        return f"{n:,} el. = {mb(r.fmap_bytes(n))}"

    rows = [
        ("parameters", lambda r: f"{r.total_params / 1e6:.3f} M ({r.weight_params:,} conv/linear weights)"),
        ("FP32 bytes (all parameters)", lambda r: mb(r.fp32_bytes)),
        (f"all parameters at {w_bits} bits (FP32 / {32 / w_bits:g})", lambda r: mb(r.all_params_bytes())),
        ("C_size (eq. 6, 1e6 bits)", lambda r: f"{r.c_size_bits / 1e6:.3f}"),
        ("weights packed", lambda r: mb(r.weight_bytes)),
        ("deployed (weights + int32 bias per channel)", lambda r: mb(r.deployed_bytes)),
        (f"largest feature map ({a_bits}-bit)", lambda r: fmap(r, r.fmap_max_elems)),
        (f"all feature maps ({a_bits}-bit)", lambda r: fmap(r, r.fmap_sum_elems)),
        ("inference memory, 1 image (App. F)", lambda r: mb(r.footprint_bytes)),
    ]
    for name, fn in rows:
        t.add_row(name, *[fn(r) for _, r in reports])
    console.print(t)
    if out is not None:
        atomic_write_json(out, {label: r.to_dict() for label, r in reports})
        console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add the deployment commands to the ``quantbench`` app."""
    for fn in (export, verify, latency, size):
        app.command()(friendly_errors(fn))
