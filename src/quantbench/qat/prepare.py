"""From a calibrated PTQ graph to a QAT graph, in place: the same quantizers learn, the same layers fold BN
their QAT way; the backend's placement is untouched."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantbench.backends.spec import BackendSpec
from quantbench.errors import ConfigError
from quantbench.graph.bnfold import BN_FOLD, set_bn_fold
from quantbench.graph.qmodules import QuantWeighted
from quantbench.graph.quantize import activation_quantizers, weight_layers
from quantbench.qat.quantizers import ALGORITHMS, Algorithm, LearningRule
from quantbench.quant.quantizer import Quantizer

Init = Literal["calibrator", "paper"]


def check_compatible(algorithm: str, spec: BackendSpec, bn_fold: int) -> Algorithm:
    """The algorithm entry, or a :class:`ConfigError` saying why it cannot run on ``spec`` with ``bn_fold``."""
    alg = ALGORITHMS.get(algorithm)
    if alg.academic_only and (spec.deployable or spec.fold_bn):
        raise ConfigError(
            f"QAT algorithm {algorithm!r} runs only in the academic setting: {alg.academic_only}; backend "
            f"{spec.name!r} is a hardware setting. Use --backend academic, or a uniform algorithm "
            f"({', '.join(n for n in ALGORITHMS.names() if not ALGORITHMS.get(n).academic_only)})")
    if not alg.pow2_scales and "pow2" in (spec.weight.scale_type, spec.activation.scale_type):
        raise ConfigError(
            f"QAT algorithm {algorithm!r} cannot keep backend {spec.name!r}'s power-of-two scales: its weight scale "
            f"follows a normalisation of the weights (DoReFa's max|tanh w|, QIL's interval); use lsq, lsq+, dsq or "
            "fixed on this backend")
    if alg.per_channel_weights and spec.fold_bn and not spec.weight.per_channel:
        raise ConfigError(
            f"QAT algorithm {algorithm!r} scales each output filter by its own mean |w| (seed 003 eq. 3-4), which "
            f"needs per-channel weight scales; backend {spec.name!r} quantizes weights per tensor. Use a backend with "
            "per-channel weights (tensorrt, fbgemm, onnxruntime, acl) or the academic setting")
    if bn_fold not in BN_FOLD:
        raise ConfigError(f"--bn-fold must be one of {sorted(BN_FOLD)}, got {bn_fold}")
    if bn_fold == 4 and spec.fold_bn and not spec.weight.per_channel:
        raise ConfigError(
            f"--bn-fold 4 folds BN into the weights after quantizing them, which keeps them on an integer grid "
            f"only with per-channel weight scales; backend {spec.name!r} quantizes weights per tensor. Use "
            "--bn-fold 1, 2 or 3")
    return alg


def prepare_qat(gm: fx.GraphModule, algorithm: str = "lsq", bn_fold: int = 3, init: Init = "calibrator",
                options: dict[str, Any] | None = None, bn_freeze_step: int | None = None) -> fx.GraphModule:
    """Switch a PTQ-prepared and calibrated graph (:func:`quantbench.graph.quantize.prepare` then
    :func:`quantbench.ptq.calibrate`) to quantization-aware training, in place.

    No module is swapped: every quantizer the backend placed hosts the algorithm's learning rule
    (:meth:`~quantbench.quant.quantizer.Quantizer.enable_learning`) and every quantized layer switches to BN-fold
    strategy ``bn_fold``. ``init="calibrator"`` starts each rule from its PTQ calibration (seed 001 C.4);
    ``"paper"`` from the algorithm's own rule, applied on the first batch (call :func:`initialize_from_data`).
    """
    meta = gm.meta.get("quantbench")
    if meta is None:
        raise ConfigError("prepare_qat needs a graph from quantbench.graph.quantize.prepare (no quantbench metadata)")
    spec: BackendSpec = meta["backend"]
    alg = check_compatible(algorithm, spec, bn_fold)
    opts = alg.parse_options(options)
    hardware = spec.deployable
    if init == "calibrator" and not all(q.calibrated for q in gm.modules() if isinstance(q, Quantizer)):
        raise ConfigError("init='calibrator' needs a calibrated graph: run quantbench.ptq.calibrate first")

    for _, q in activation_quantizers(gm):
        q.enable_learning(alg, opts, hardware, init)
    strategy = BN_FOLD[bn_fold]
    for _, layer in weight_layers(gm):
        factor = strategy.quantizer_input_factor(layer)
        set_bn_fold(layer, bn_fold, bn_freeze_step)
        q = layer.weight_quantizer
        if q is not None:
            scale = None if factor is None else q.scale / factor.clamp_min(torch.finfo(torch.float32).tiny)
            q.enable_learning(alg, opts, hardware, init, init_scale=scale)
    gm.delete_all_unused_submodules()  # the BN aliases the PTQ graph kept at their original paths
    gm.meta["quantbench_qat"] = {"algorithm": algorithm, "bn_fold": bn_fold, "init": init,
                                 "options": opts.model_dump()}
    return gm


def set_fused_kernels(gm: nn.Module, on: bool) -> None:
    """Let the learning rules use their ``torch.compile``-fused kernels (LSQ / LSQ+ per tensor)."""
    for _, rule in qat_quantizers(gm):
        rule.fused_kernels = bool(on)


def qat_quantizers(gm: nn.Module) -> Iterator[tuple[str, LearningRule]]:
    """The learning rule of every learning quantizer, named after its quantizer."""
    for name, m in gm.named_modules():
        if isinstance(m, Quantizer) and m.rule is not None:
            yield name, m.rule


def qat_layers(gm: nn.Module) -> Iterator[tuple[str, QuantWeighted]]:
    """The quantized layers of a QAT graph (the ones whose weight quantizer learns, or that are kept float)."""
    for name, m in weight_layers(gm):
        if m.weight_quantizer is None or m.weight_quantizer.rule is not None:
            yield name, m


def quantizer_parameters(gm: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of every QAT quantizer (their own optimizer group)."""
    seen: dict[int, nn.Parameter] = {}
    for _, q in qat_quantizers(gm):
        for p in q.parameters():
            seen[id(p)] = p
    return list(seen.values())


@torch.no_grad()
def initialize_from_data(gm: nn.Module, x: Tensor) -> int:
    """Run ``x`` through the graph in eval mode so quantizers without initialisation apply their paper rule
    (the same batch on every process, before DDP wraps the model). Returns how many were initialised."""
    pending = [q for _, q in qat_quantizers(gm) if not q._ready]
    if pending:
        was_training = gm.training
        gm.eval()
        gm(x)
        gm.train(was_training)
    return len(pending)


def quantizer_table(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Every quantizer's algorithm, role, integer range, scale, zero-point and clipping range (plain lists)."""
    sites = gm.meta.get("quantbench", {}).get("sites", {})
    rows = []
    for _, q in qat_quantizers(gm):
        row = q.describe()
        site = sites.get(q.name)
        row["role"] = "weight" if q.is_weight else (site.role if site else "activation")
        rows.append(row)
    return rows
