"""Reconstruction PTQ (AdaRound, BRECQ, QDrop) over the units of a calibrated, prepared model.

Order: calibrate -> optional BN re-calibration -> :func:`reconstruct`. Unit by unit, in graph order:

1. the *float* unit (every quantizer in it switched off) runs once on the unit's cached float input: the
   target, and the next unit's float input;
2. the method learns (AdaRound's rounding of each layer on the layer's quantized input; BRECQ / QDrop on
   the unit as a whole), then writes what it learned back as static qparams and weights on the grid
   (:meth:`QuantWeighted.bake`, :meth:`Quantizer.bake`);
3. the *quantized* unit, now final, runs once on its cached quantized input (with ONNX Runtime's integer
   arithmetic where the backend simulates it): the next unit's quantized input.

So the whole model is run about twice over the reconstruction images (AdaRound adds the part of each unit
before each of its layers), never once per unit; cached tensors live on the CPU (or the GPU when asked) and
are released unit by unit, so memory does not grow. Afterwards nothing may re-derive the weight scales:
:func:`quantbench.graph.quantize.calibrate_weights` refuses a reconstructed model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

import quantbench.qat.quantizers  # noqa: F401  (registers LSQ, the activation steps' learning rule)
from quantbench.errors import QuantbenchError
from quantbench.graph.qmodules import QuantWeighted
from quantbench.qat.quantizers.lsq_kernel import fused_kernels_available
from quantbench.quant.drop import drop as mix
from quantbench.quant.quantizer import Quantizer
from quantbench.recon.adaround import ADAROUND, AdaRoundRule, LinearTempDecay, lp_loss
from quantbench.recon.config import RECON_METHODS, ReconMethod, ReconOptions
from quantbench.recon.units import Unit, extract, fuse_end, partition
from quantbench.utils.progress import LossBar

RUN_BATCH = 128  # images per forward when filling the caches


class ReconstructionError(QuantbenchError):
    """Reconstruction asked of a model that is not ready for it, or in the wrong order."""


@dataclass
class UnitReport:
    name: str
    layers: list[str]
    iters: int
    seconds: float
    loss_first: float
    loss_last: float
    peak_rss_mib: float | None = None  # the process's peak resident memory after this unit (flat = no growth)


@dataclass
class ReconReport:
    """What one reconstruction did: method, units, iterations, time, the passes over the data it cost."""

    method: str
    preset: str
    iters: int
    n_images: int
    seconds: float
    passes: float  # forward passes over the reconstruction set, in units of the whole model
    units: list[UnitReport] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


class _Passes:
    """Counts layer executions over the reconstruction images (1.0 = the whole model over every image)."""

    def __init__(self, n_layers: int, n_images: int) -> None:
        self.total = max(n_layers * n_images, 1)
        self.done = 0

    def add(self, sub: fx.GraphModule, n: int) -> None:
        self.done += n * sum(isinstance(m, QuantWeighted) for m in sub.modules())

    @property
    def passes(self) -> float:
        return self.done / self.total


def peak_rss_mib() -> float | None:
    """The process's peak resident set size in MiB (None where the platform does not say)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _unit_modules(gm: fx.GraphModule, unit: Unit) -> tuple[list[QuantWeighted], list[Quantizer]]:
    layers = [gm.get_submodule(name) for name in unit.layers]
    seen: set[int] = set()
    acts: list[Quantizer] = []
    for name in unit.quantizers:
        q = gm.get_submodule(name)
        if id(q) not in seen:
            seen.add(id(q))
            acts.append(q)  # type: ignore[arg-type]
    return layers, acts  # type: ignore[return-value]


@contextlib.contextmanager
def float_mode(quantizers: list[Quantizer]) -> Iterator[None]:
    """Every given quantizer passes its input through (restored afterwards)."""
    saved = [q.quantizing for q in quantizers]
    try:
        for q in quantizers:
            q.quantizing = False
        yield
    finally:
        for q, s in zip(quantizers, saved, strict=True):
            q.quantizing = s


def _all_quantizers(layers: list[QuantWeighted], acts: list[Quantizer]) -> list[Quantizer]:
    return [*acts, *(lay.weight_quantizer for lay in layers if lay.weight_quantizer is not None)]


class _Cache:
    """Tensors over the reconstruction images, on the CPU (or the device), in float32 or float16."""

    def __init__(self, device: torch.device, opts: ReconOptions) -> None:
        self.device = device
        self.store_device = device if opts.cache_on_device else torch.device("cpu")
        self.dtype = torch.float16 if opts.cache_dtype == "float16" else torch.float32
        self.spill = Path(opts.cache_dir) if opts.cache_dir is not None else None
        if self.spill is not None:
            self.spill.mkdir(parents=True, exist_ok=True)

    def put(self, t: Tensor) -> Tensor:
        t = t.detach().to(self.store_device, self.dtype)
        return t if self.spill is None or self.store_device.type != "cpu" else self._spilled(t)

    def _spilled(self, t: Tensor) -> Tensor:
        """``t`` as a tensor over a memory-mapped file; the file's name is removed at once (Linux and macOS keep
        the data while it is mapped), so nothing is left behind whatever happens."""
        assert self.spill is not None
        fd, name = tempfile.mkstemp(prefix="recon-", suffix=".bin", dir=self.spill)
        os.close(fd)
        try:
            mm = torch.from_file(name, shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
            mm.copy_(t)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)
        return mm

    def get(self, t: Tensor, idx: Tensor | slice) -> Tensor:
        return t[idx].to(self.device, torch.float32, non_blocking=True)

    @torch.no_grad()
    def run(self, sub: fx.GraphModule, x: Tensor, passes: _Passes) -> Tensor:
        outs = [sub(self.get(x, slice(i, i + RUN_BATCH))).to(self.store_device, self.dtype)
                for i in range(0, x.shape[0], RUN_BATCH)]
        passes.add(sub, x.shape[0])
        return self.put(torch.cat(outs))


def check_ready(gm: fx.GraphModule) -> None:
    """A prepared, calibrated, not yet reconstructed model (else a one-line error with the fix)."""
    meta = gm.meta.get("quantbench") if isinstance(gm, fx.GraphModule) else None
    if meta is None:
        raise ReconstructionError("reconstruction needs a model from quantbench.graph.quantize.prepare(...)")
    if meta.get("reconstructed"):
        raise ReconstructionError(f"this model was already reconstructed ({meta['reconstructed']}); prepare and "
                                  "calibrate it again to run another method")
    qs = [m for m in gm.modules() if isinstance(m, Quantizer)]
    if not qs or not all(q.calibrated for q in qs):
        raise ReconstructionError("calibrate the model first (quantbench.ptq.calibrate): reconstruction keeps the "
                                  "calibrated weight scales and starts the activation steps from them")
    if any(q.learning for q in qs):
        raise ReconstructionError("the model has learning quantizers (QAT): bake() it before reconstruction")


def reconstruct(gm: fx.GraphModule, images: Tensor, method: str | ReconMethod, options: ReconOptions | None = None,
                device: torch.device | str = "cpu", progress: bool = True) -> ReconReport:
    """Reconstruct ``gm`` (prepared and calibrated) in place from ``images`` (N, C, H, W) with ``method``."""
    m = RECON_METHODS.get(method) if isinstance(method, str) else method
    opts = options or ReconOptions()
    check_ready(gm)
    dev = torch.device(device)
    if images.shape[0] == 0:
        raise ReconstructionError("the reconstruction set is empty: give at least one image (--recon-size)")
    iters = opts.resolved_iters(dev.type)
    gm.eval()
    cache = _Cache(dev, opts)
    units = partition(gm, "block")
    n_layers = sum(len(u.layers) for u in units)
    passes = _Passes(n_layers, images.shape[0])
    granularity = opts.granularity or m.granularity
    hardware = bool(gm.meta["quantbench"]["backend"].deployable)
    t0 = time.perf_counter()
    report = ReconReport(m.name, opts.preset(dev.type), iters, images.shape[0], 0.0, 0.0,
                         options=opts.model_dump())
    fp_in = q_in = cache.put(images)
    frozen = [p for p in gm.parameters() if p.requires_grad]  # the network's own weights never learn here
    for prm in frozen:
        prm.requires_grad_(False)
    with LossBar(len(units), f"{m.name}", enabled=progress) as bar, _restore_grad(frozen):
        for unit in units:
            layers, acts = _unit_modules(gm, unit)
            sub = extract(gm, unit.input, unit.output, unit.nodes)
            modules = dict(gm.named_modules())
            targets = sorted({fuse_end(n, modules) for n in unit.nodes
                              if n.op == "call_module" and str(n.target) in unit.layers}, key=unit.nodes.index) \
                if granularity == "layer" else []
            with float_mode(_all_quantizers(layers, acts)):
                fp_out, layer_targets = _run_float(gm, unit, sub, fp_in, targets, cache, passes)
            t_unit = time.perf_counter()
            learner = _Learner(m, opts, iters, cache, dev, hardware, bar)
            if granularity == "layer":
                losses = _layerwise(gm, unit, layer_targets, q_in, learner, cache, passes)
            else:
                losses = learner.unit(sub, layers, acts, q_in, fp_in, fp_out, unit.name)
            bar.advance()
            report.units.append(UnitReport(unit.name, unit.layers, iters, time.perf_counter() - t_unit, *losses,
                                           peak_rss_mib=peak_rss_mib()))
            q_in = cache.run(sub, q_in, passes)
            fp_in = fp_out
            del layer_targets
    report.seconds = time.perf_counter() - t0
    report.passes = passes.passes
    gm.meta["quantbench"]["reconstructed"] = m.name
    gm.meta["quantbench"]["reconstruction"] = report
    return report


@contextlib.contextmanager
def _restore_grad(params: list[nn.Parameter]) -> Iterator[None]:
    try:
        yield
    finally:
        for prm in params:
            prm.requires_grad_(True)


def _run_float(gm: fx.GraphModule, unit: Unit, sub: fx.GraphModule, x: Tensor, targets: list[fx.Node],
               cache: _Cache, passes: _Passes) -> tuple[Tensor, dict[str, Tensor]]:
    """The unit's float output, and the outputs of the ``targets`` nodes by name (one pass)."""
    if not targets:
        return cache.run(sub, x, passes), {}
    probe = extract(gm, unit.input, unit.output, unit.nodes, also=targets)
    chunks: list[list[Tensor]] = []
    with torch.no_grad():
        for i in range(0, x.shape[0], RUN_BATCH):
            chunks.append([t.to(cache.store_device, cache.dtype) for t in probe(cache.get(x, slice(i, i + RUN_BATCH)))])
    passes.add(sub, x.shape[0])
    cols = [cache.put(torch.cat(c)) for c in zip(*chunks, strict=True)]
    return cols[0], {n.name: col for n, col in zip(targets, cols[1:], strict=True)}


def _layerwise(gm: fx.GraphModule, unit: Unit, layer_targets: dict[str, Tensor], q_in: Tensor, learner: _Learner,
               cache: _Cache, passes: _Passes) -> tuple[float, float]:
    """AdaRound: each layer of the unit on its quantized input (the unit before it, already rounded)."""
    modules = dict(gm.named_modules())
    first, last = float("nan"), float("nan")
    for n in unit.nodes:
        if n.op != "call_module" or str(n.target) not in unit.layers:
            continue
        layer = modules[str(n.target)]
        assert isinstance(layer, QuantWeighted)
        if layer.weight_quantizer is None:
            continue
        end = fuse_end(n, modules)
        inp = n.args[0]
        assert isinstance(inp, fx.Node)
        x = q_in if inp is unit.input else cache.run(extract(gm, unit.input, inp, _upto(unit, inp)), q_in, passes)
        group = extract(gm, inp, end, _chain(n, end))
        f, la = learner.unit(group, [layer], [], x, None, layer_targets[end.name], str(n.target))
        first = f if first != first else first
        last = la
    return first, last


def _chain(start: fx.Node, end: fx.Node) -> list[fx.Node]:
    """``start`` and its single users up to ``end`` (a layer with its BN and activation)."""
    out = [start]
    while out[-1] is not end:
        out.append(next(iter(out[-1].users)))
    return out


def _upto(unit: Unit, node: fx.Node) -> list[fx.Node]:
    return unit.nodes[:unit.nodes.index(node) + 1]


class _Learner:
    """The optimisation loop of one unit (or one layer): rounding, activation steps, dropping."""

    def __init__(self, method: ReconMethod, opts: ReconOptions, iters: int, cache: _Cache, device: torch.device,
                 hardware: bool, bar: LossBar) -> None:
        self.m, self.opts, self.iters, self.cache, self.device = method, opts, iters, cache, device
        self.hardware, self.bar = hardware, bar
        self.fused = fused_kernels_available(device.type) if opts.fused is None else opts.fused

    def unit(self, sub: fx.GraphModule, layers: list[QuantWeighted], acts: list[Quantizer], q_in: Tensor,
             fp_in: Tensor | None, target: Tensor, name: str) -> tuple[float, float]:
        """Learn, then bake; returns the reconstruction loss of the first and the last step."""
        m, opts = self.m, self.opts
        rules = [self._start_rounding(lay) for lay in layers if lay.weight_quantizer is not None] if m.weights else []
        learn_acts = [q for q in acts if q.quantizing and q.calibrated]
        joint = m.activations == "joint" or (m.activations == "after" and opts.brecq_variant == "joint")
        drop = opts.drop_prob if m.drop else 0.0
        try:
            if joint:
                self._start_steps(learn_acts)
                losses = self._loop(sub, rules, learn_acts, q_in, fp_in, target, self.iters, drop, opts.p, name)
            else:
                with float_mode(learn_acts if m.activations == "after" else []):
                    losses = self._loop(sub, rules, [], q_in, None, target, self.iters, 0.0, opts.p, name)
                if m.activations == "after" and learn_acts:
                    for r in rules:
                        r.hard = True
                    self._start_steps(learn_acts)
                    iters_a = opts.iters_a or max(self.iters // 4, 1)
                    losses = (losses[0],
                              self._loop(sub, [], learn_acts, q_in, None, target, iters_a, 0.0, opts.p_act, name)[1])
        finally:
            for q in learn_acts:
                q.drop_prob = 0.0
        for lay in layers:
            if lay.weight_quantizer is not None and lay.weight_quantizer.rule is not None:
                lay.weight_quantizer.rule.hard = True  # type: ignore[union-attr]
                lay.bake()
        for q in learn_acts:
            q.bake()
        return losses

    def _start_rounding(self, layer: QuantWeighted) -> AdaRoundRule:
        wq = layer.weight_quantizer
        assert wq is not None
        w, _ = layer.folded_weight_bias()
        rule = wq.enable_learning(ADAROUND, None, self.hardware, "calibrator")
        assert isinstance(rule, AdaRoundRule)
        rule.init_from_tensor(w.detach())
        rule.mark_initialized()
        return rule

    def _start_steps(self, acts: list[Quantizer]) -> None:
        for q in acts:
            if q.rule is None:
                rule = q.enable_learning("lsq", None, self.hardware, "calibrator")
                rule.fused_kernels = self.fused

    def _loop(self, sub: fx.GraphModule, rules: list[AdaRoundRule], acts: list[Quantizer], q_in: Tensor,
              fp_in: Tensor | None, target: Tensor, iters: int, drop: float, p: float,
              name: str) -> tuple[float, float]:
        opts, cache = self.opts, self.cache
        opt_w = torch.optim.Adam([r.alpha for r in rules], lr=opts.lr_w) if rules else None
        a_params = [prm for q in acts for prm in q.rule.parameters()] if acts else []  # type: ignore[union-attr]
        opt_a = torch.optim.Adam(a_params, lr=opts.resolved_lr_a(iters)) if a_params else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_a, T_max=iters, eta_min=0.0) if opt_a else None
        if opt_w is None and opt_a is None:
            return float("nan"), float("nan")
        for q in acts:
            q.drop_prob = drop
        temp = LinearTempDecay(iters, opts.warmup, opts.b_start, opts.b_end)
        n = q_in.shape[0]
        first = last = float("nan")
        self.bar.start(name, iters)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=opts.bf16)
        for t in range(iters):
            idx = torch.randint(n, (min(opts.batch_size, n),))
            x = cache.get(q_in, idx)
            if drop > 0 and fp_in is not None:
                x = mix(x, cache.get(fp_in, idx), drop)
            with autocast:
                out = sub(x)
            rec = lp_loss(out.float(), cache.get(target, idx), p)
            loss = rec
            if rules and temp.regularizing(t) and opts.round_weight > 0:
                beta = temp(t)
                loss = rec + opts.round_weight * sum(r.regularizer(beta) for r in rules)
            for o in (opt_w, opt_a):
                if o is not None:
                    o.zero_grad(set_to_none=True)
            loss.backward()
            for o in (opt_w, opt_a):
                if o is not None:
                    o.step()
            if sched is not None:
                sched.step()
            if t == 0 or t == iters - 1 or t % 50 == 0:
                value = float(rec.detach())
                if t == 0:
                    first = value
                last = value
                if not value == value or value == float("inf"):
                    raise ReconstructionError(f"{name}: the reconstruction loss is {value} at step {t}; lower "
                                              "--recon-option lr_w / lr_a or check the calibration")
                self.bar.update(t + 1, value)
        self.bar.update(iters, last)
        return first, last
