"""A finished CoQuant run (its ``final.pt``) evaluated at one bit-width, trained, evaluated before, or new: a new
bit-width gets its rules and BNs by BN calibration (zero-shot, seed 002 Table 3) exactly as the run's own evaluation
would have made them, so ``quantbench ptq --from RUN --bits b`` and a sweep's ``coquant`` rows agree with it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx
from torch.utils.data import Subset

from quantbench.coquant.config import CoQuantConfig
from quantbench.coquant.load import load_coquant_run
from quantbench.coquant.pipeline import BitResult, bn_calibration_loader, calibrate_bits
from quantbench.coquant.switch import freeze_at
from quantbench.data import load_data, make_loader
from quantbench.errors import ConfigError
from quantbench.models import build_model, get_entry
from quantbench.ptq import compare, predict


@dataclass
class RunEvaluation:
    """One bit-width of a CoQuant run: its accuracy, the run's config and the network frozen at that bit-width."""

    result: BitResult
    fp_top1: float
    n_test: int
    config: CoQuantConfig
    trained_bits: list[int]
    graph: fx.GraphModule  # an ordinary QAT graph at ``result.bits`` (cards, size, bake)
    seconds: float  # BN calibration and evaluation

    def to_dict(self) -> dict[str, object]:
        return {"bits": self.result.bits, "quant_top1": self.result.quant_top1, "agreement": self.result.agreement,
                "zero_shot": self.result.zero_shot, "bn_calib_images": self.result.bn_calib_images,
                "fp_top1": self.fp_top1, "n_test": self.n_test, "trained_bits": self.trained_bits,
                "interpretations": self.config.interpretations()}


def evaluate_run(path: str | Path, bits: int, device: str = "cpu", progress: bool = False,
                 max_test: int | None = None) -> RunEvaluation:
    """Top-1 and agreement of the run at ``path`` at ``bits`` (2-8) on its test split (``max_test``: the first N;
    default the run's own setting)."""
    if not 2 <= bits <= 8:
        raise ConfigError(f"a CoQuant network runs at 2..8 bits, got {bits}")
    t0 = time.perf_counter()
    gm, sw, cfg = load_coquant_run(path)
    gm.to(device)
    stored = {b for sbn in sw.bns.values() for b in sbn.bits} | set(sw.state.trained)
    zero_shot = bits not in sw.state.trained
    if bits not in stored:
        n_bn = calibrate_bits(cfg, gm, sw, bits, bn_calibration_loader(cfg), device)
    else:  # calibrated when the run evaluated it (zero-shot), or re-estimated there (bn_recalibrate)
        n_bn = cfg.bn_calib_size if zero_shot or cfg.bn_recalibrate else 0
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size, augment=False)
    test = bundle.test
    limit = max_test if max_test is not None else cfg.max_test
    if limit is not None and limit < len(test):  # type: ignore[arg-type]
        test = Subset(test, range(limit))
    loader = make_loader(test, cfg.eval_batch_size)
    float_model = build_model(cfg.model, cfg.weights, cfg.width_mult, num_classes=bundle.num_classes).to(device)
    fp_pred, labels = predict(float_model.eval(), loader, device, progress, "evaluating FP32")
    gm.eval()
    with sw.state.at(bits):
        pred = predict(gm, loader, device, progress, f"evaluating {bits} bits")[0]
    ev = compare(fp_pred, pred, labels)
    return RunEvaluation(BitResult(bits, ev.quant_top1, ev.agreement, zero_shot, n_bn), ev.fp_top1, ev.n,
                         cfg, list(sw.state.trained), freeze_at(gm, bits).eval(), time.perf_counter() - t0)
