"""From a calibrated PTQ graph to a QAT graph: swap quantizers and layers, keep the backend's placement."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantbench.backends.spec import BackendSpec
from quantbench.errors import ConfigError
from quantbench.graph.qmodules import QuantWeighted
from quantbench.qat.bnfold import BN_FOLD, QATWeighted
from quantbench.qat.quantizers import ALGORITHMS, Algorithm, QATQuantizer, QuantizerContext
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
    if bn_fold not in BN_FOLD:
        raise ConfigError(f"--bn-fold must be one of {sorted(BN_FOLD)}, got {bn_fold}")
    if bn_fold == 4 and spec.fold_bn and not spec.weight.per_channel:
        raise ConfigError(
            f"--bn-fold 4 folds BN into the weights after quantizing them, which keeps them on an integer grid "
            f"only with per-channel weight scales; backend {spec.name!r} quantizes weights per tensor. Use "
            "--bn-fold 1, 2 or 3")
    return alg


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def _replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, m in list(root.named_modules(remove_duplicate=False)):
        if m is old:
            _set_submodule(root, name, new)


def prepare_qat(gm: fx.GraphModule, algorithm: str = "lsq", bn_fold: int = 3, init: Init = "calibrator",
                options: dict[str, Any] | None = None, bn_freeze_step: int | None = None) -> fx.GraphModule:
    """Turn a PTQ-prepared and calibrated graph (:func:`quantbench.graph.quantize.prepare` then
    :func:`quantbench.ptq.calibrate`) into a QAT graph, in place.

    Every activation ``Quantizer`` becomes the algorithm's activation quantizer and every ``QuantWeighted``
    the strategy ``bn_fold``'s layer with the algorithm's weight quantizer, where the backend placed them.
    ``init="calibrator"`` starts each quantizer from its PTQ calibration (seed 001 C.4); ``"paper"`` from the
    algorithm's own rule, applied on the first batch (call :func:`initialize_from_data`).
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

    for _, q in [(n, m) for n, m in gm.named_modules() if isinstance(m, Quantizer) and not m.is_weight]:
        new = alg.build(QuantizerContext.from_quantizer(q, hardware), opts)
        if init == "calibrator":
            new.init_from_quantizer(q)
        q.quantizing = False  # integer-arithmetic links may still point at it: keep it inert
        _replace_everywhere(gm, q, new)

    fold = BN_FOLD[bn_fold]
    for name, layer in [(n, m) for n, m in gm.named_modules() if isinstance(m, QuantWeighted)]:
        wq = None
        if layer.weight_quantizer is not None:
            q = layer.weight_quantizer
            wq = alg.build(QuantizerContext.from_quantizer(q, hardware), opts)
            if init == "calibrator":
                factor = fold.quantizer_input_factor(layer)
                scale = q.scale if factor is None else q.scale / factor.clamp_min(torch.finfo(torch.float32).tiny)
                wq.init_from_qparams(scale, q.zero_point)
        _set_submodule(gm, name, fold.from_layer(layer, wq, bn_freeze_step))
    gm.delete_all_unused_submodules()  # the BN aliases the PTQ graph kept at their original paths
    gm.meta["quantbench_qat"] = {"algorithm": algorithm, "bn_fold": bn_fold, "init": init,
                                 "options": opts.model_dump()}
    gm.recompile()
    return gm


def qat_quantizers(gm: nn.Module) -> Iterator[tuple[str, QATQuantizer]]:
    for name, m in gm.named_modules():
        if isinstance(m, QATQuantizer):
            yield name, m


def qat_layers(gm: nn.Module) -> Iterator[tuple[str, QATWeighted]]:
    for name, m in gm.named_modules():
        if isinstance(m, QATWeighted):
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
