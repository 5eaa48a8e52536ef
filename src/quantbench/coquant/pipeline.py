"""One CoQuant run end to end: prepare and calibrate at B's highest precision (QAT's pipeline), make every
quantizer and BatchNorm switchable, train with seed 002's loss in QAT's trainer, then evaluate at every bit-width
(unseen ones zero-shot, after BN calibration)."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from quantbench.coquant.config import CoQuantConfig
from quantbench.coquant.loss import CoQuantLoss
from quantbench.coquant.switch import Switched, add_bits, make_switchable, recalibrate_bits
from quantbench.data import calibration_subset, load_data, make_loader
from quantbench.graph.quantize import all_quantizers, prepare
from quantbench.models import build_model, get_entry
from quantbench.ptq import calibrate, compare, predict
from quantbench.qat.checkpoint import save_checkpoint
from quantbench.qat.distributed import init_distributed
from quantbench.qat.pipeline import PreparedRun, make_trainer, prepare_run
from quantbench.qat.quantizers import ALGORITHMS
from quantbench.qat.train import check_run_dir
from quantbench.utils.io import atomic_write_text


@dataclass
class BitResult:
    """The network evaluated at one bit-width."""

    bits: int
    quant_top1: float
    agreement: float
    zero_shot: bool
    bn_calib_images: int


@dataclass
class CoQuantResult:
    model: str
    data: str
    backend: str
    trained_bits: list[int]
    fp_top1: float
    n_test: int
    epochs: int
    train_images: int
    train_seconds: float
    teacher: str
    results: list[BitResult] = field(default_factory=list)
    interpretations: dict[str, str] = field(default_factory=dict)
    out_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def at(self, bits: int) -> BitResult:
        return next(r for r in self.results if r.bits == bits)


def switch(run: PreparedRun, cfg: CoQuantConfig) -> Switched:
    """Every quantizer of the prepared graph gets one rule per bit-width of B (the algorithm's rule)."""
    alg = ALGORITHMS.get(cfg.algorithm)
    opts = alg.parse_options(cfg.algorithm_options)
    return make_switchable(run.gm, tuple(cfg.bits), lambda _rule: (lambda ctx: alg.build(ctx, opts)), opts)  # type: ignore[arg-type]


@torch.no_grad()
def calibrate_lower_bits(cfg: CoQuantConfig, run: PreparedRun, sw: Switched, loader: Any, num_classes: int) -> int:
    """Start each lower bit-width's rules from a calibration *at that bit-width* (seed 001 C.4, as a network
    trained at b alone starts): the graph prepared at b is calibrated on ``loader`` and every switched quantizer's
    rule at b takes that clipping range. Starting a 2-bit PACT α from the 8-bit range quantizes most activations
    to zero, and the near-chance 2-bit loss then drags the shared weights. Needs the pretrained weights (a network
    trained from scratch keeps the top bit-width's range). Returns the bit-widths calibrated."""
    entry = get_entry(cfg.model)
    w_obs, a_obs = cfg.observers()
    example = torch.zeros(1, *entry.input_size, device=next(run.gm.parameters()).device)
    float_model = build_model(cfg.model, cfg.weights, cfg.width_mult, num_classes=num_classes).eval()
    n = 0
    for b in sw.state.trained[1:]:
        gm_b = prepare(copy.deepcopy(float_model).to(example.device), cfg.backend_at(b), example, w_obs, a_obs,
                       cfg.w_observer_options, cfg.a_observer_options)
        calibrate(gm_b, loader, example.device, False)
        by_name = {q.name: q for q in all_quantizers(gm_b)}
        for name, rule in sw.rules.items():
            q = by_name.get(name)
            if q is not None and q.calibrated:
                inner = rule.at(b)
                inner.init_from_qparams(q.scale, q.zero_point)
        n += 1
    return n


def bn_calibration_loader(cfg: CoQuantConfig) -> Any:
    """The ``bn_calib_size`` training images that calibrate BN (augmented like training unless
    ``bn_calib_augment`` is off): a network's BN statistics describe the images it trained on, and on this
    subset statistics re-estimated from un-augmented images cost the float ResNet-20 4 points (91.63 -> 87.45)."""
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size, augment=cfg.bn_calib_augment)
    return make_loader(calibration_subset(bundle, cfg.bn_calib_size, cfg.seed + 1, augment=cfg.bn_calib_augment),
                       cfg.calib_batch_size)


def calibrate_bits(cfg: CoQuantConfig, gm: Any, sw: Switched, bits: int, loader: Any,
                   device: torch.device | str) -> int:
    """BN calibration at ``bits``: a new bit-width's rules and BNs (zero-shot), or a trained one's statistics
    re-estimated. The augmentation draws from a generator seeded by the run's seed, so it repeats."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1 + bits)
        if bits in sw.state.trained:
            return recalibrate_bits(gm, sw, bits, loader, device)
        return add_bits(gm, sw, bits, loader, device, cfg.zero_shot_ranges)


def evaluate_bits(cfg: CoQuantConfig, run: PreparedRun, sw: Switched, device: torch.device | str,
                  progress: bool = False) -> list[BitResult]:
    """Top-1 and agreement at every evaluated bit-width; unseen ones after BN calibration on ``bn_calib_size``
    training images (seed 002 Table 3)."""
    out = []
    bn_loader = None
    for b in cfg.evaluated_bits():
        zero_shot = b not in sw.state.trained
        n_bn = 0
        if zero_shot or cfg.bn_recalibrate:
            bn_loader = bn_loader or bn_calibration_loader(cfg)
            n_bn = calibrate_bits(cfg, run.gm, sw, b, bn_loader, device)
        run.gm.eval()
        with sw.state.at(b):
            pred = predict(run.gm, run.test_loader, device, progress, f"evaluating {b} bits")[0]
        ev = compare(run.fp_pred, pred, run.labels)
        out.append(BitResult(b, ev.quant_top1, ev.agreement, zero_shot, n_bn))
    return out


def run_coquant(cfg: CoQuantConfig, resume: bool = False, progress: bool = True, overwrite: bool = False
                ) -> CoQuantResult:
    """Train one network over B (seed 002 Algorithm 1) and evaluate it at every bit-width."""
    cfg.check()
    out_dir = cfg.run_dir()
    ctx = init_distributed(cfg.device)
    check_run_dir(out_dir, resume, overwrite, remove=ctx.is_main)
    ctx.barrier()
    run = prepare_run(cfg, ctx, progress)
    sw = switch(run, cfg)
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size, augment=False)
    loader = make_loader(calibration_subset(bundle, cfg.calib_size, cfg.seed), cfg.calib_batch_size)
    if cfg.init == "calibrator" and cfg.weights is not None:  # from scratch: the 8-bit range is all there is
        calibrate_lower_bits(cfg, run, sw, loader, bundle.num_classes)
    if cfg.bn_init:  # every trained bit-width's BN re-estimated at that bit-width (QAT's bn_init did the top one)
        for b in sw.state.trained[1:]:
            recalibrate_bits(run.gm, sw, b, loader, ctx.device)
    loss = CoQuantLoss(sw, p1=cfg.p1, lam=cfg.lam, distance=cfg.distance, temperature=cfg.temperature,
                       kd=cfg.teacher != "none", teacher="recursive" if cfg.teacher == "recursive" else "dynamic",
                       generator=torch.Generator().manual_seed(cfg.seed), ramp=cfg.ramp_epochs / cfg.epochs)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())
    trainer = make_trainer(cfg, run, ctx, progress, compute_loss=loss)
    loss.progress = lambda: trainer.step / max(1, trainer.total_steps)
    t0 = time.perf_counter()
    outcome = trainer.fit(resume)
    train_s = outcome.seconds or time.perf_counter() - t0
    results = evaluate_bits(cfg, run, sw, ctx.device, progress) if ctx.is_main else []
    result = CoQuantResult(
        model=cfg.model, data=cfg.data, backend=cfg.resolved_backend().name, trained_bits=list(sw.state.trained),
        fp_top1=compare(run.fp_pred, run.fp_pred, run.labels).fp_top1 if ctx.is_main else 0.0,
        n_test=int(run.labels.numel()), epochs=cfg.epochs, train_images=len(run.train), train_seconds=train_s,
        teacher=cfg.teacher, results=results,
        interpretations=cfg.interpretations(),
        out_dir=str(out_dir))
    if ctx.is_main:
        save_checkpoint(out_dir / "final.pt", {"config": cfg.model_dump(mode="json"), "model": run.gm.state_dict(),
                                               "bits": [r.bits for r in results], "metrics": {}})
        atomic_write_text(out_dir / "result.json", json.dumps(result.to_dict(), indent=2) + "\n")
    return result

