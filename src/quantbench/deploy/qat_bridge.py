"""Export a QAT model: rebuild the integer simulation from the trained QAT quantizers and layers.

A QAT graph (:func:`quantbench.qat.prepare.prepare_qat`) keeps the PTQ placement but swaps in learnable
quantizers and BN-folding layers. Each uniform QAT quantizer reports the grid its output lies on
(``export_qparams``) and each layer the weight and bias it runs in evaluation (``deployed_weight_bias``);
this module turns them back into calibrated :class:`~quantbench.quant.quantizer.Quantizer` and
:class:`~quantbench.graph.qmodules.QuantWeighted` modules and re-links the integer arithmetic, so the
result exports and verifies like a PTQ model. A weight that is not on the reported grid (nor on that grid
scaled by the BN factor, BN-fold strategy 4) is refused rather than re-rounded.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from quantbench.deploy.errors import ExportError
from quantbench.graph.linking import link_integer_arithmetic
from quantbench.graph.qmodules import QuantWeighted
from quantbench.quant.quantizer import Quantizer

GRID_TOLERANCE = 1e-3  # in units of the step: a weight this close to a grid point is on it


def _qat():
    try:
        from quantbench.qat import prepare as qat_prepare
    except ImportError as exc:  # pragma: no cover - the QAT package ships with quantbench
        raise ExportError(f"exporting a QAT run needs quantbench.qat ({exc})") from exc
    return qat_prepare


def _quantizer(scheme, qmin: int, qmax: int, scale: Tensor, zero_point: Tensor, is_weight: bool,
               name: str) -> Quantizer:
    q = Quantizer(scheme, "minmax", is_weight, name)
    q.qrange_t = torch.tensor([qmin, qmax], dtype=torch.int64)
    q.scale = scale.detach().reshape(-1).to(torch.float32).clone()
    q.zero_point = torch.round(zero_point.detach().reshape(-1)).to(torch.int32).clone()
    q.calibrated_t = torch.tensor(True)
    q.quantizing = True
    return q


def _replace(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for name, m in list(root.named_modules(remove_duplicate=False)):
        if m is old:
            parent, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, attr, new)


def _on_grid(w: Tensor, scale: Tensor) -> bool:
    s = scale.reshape(-1, *([1] * (w.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
    r = w / s
    return bool(((r - torch.round(r)).abs() <= GRID_TOLERANCE).all())


def _weight_layer(layer: nn.Module, name: str) -> QuantWeighted:
    with torch.no_grad():
        w, b = layer.deployed_weight_bias()
    module = copy.deepcopy(layer.module)
    module.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    if b is not None:
        module.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    wq = layer.weight_quantizer
    if wq is None:
        return QuantWeighted(module, None)
    qp = wq.export_qparams()
    if qp is None:
        raise ExportError(f"{name}: QAT algorithm {wq.algorithm!r} has non-uniform weight levels; no integer "
                          "runtime executes them, so it cannot be exported")
    scale, zp = qp
    candidates = [scale.reshape(-1)]
    if getattr(layer, "bn", None) is not None and scale.numel() == w.shape[0]:
        candidates.append(scale.reshape(-1) * layer.bn_factor().detach().abs())  # BN folded after quantizing
    for s in candidates:
        if _on_grid(w.detach(), s):
            q = _quantizer(wq.ctx.scheme, wq.qmin, wq.qmax, s, zp.reshape(-1).expand_as(s), True, f"{name}.weight")
            return QuantWeighted(module, q)
    raise ExportError(f"{name}: the deployed weight of this QAT layer is not on its quantizer's grid, so exporting "
                      "it would re-round trained weights; export a layer whose evaluation weight is quantized")


def simulation_from_qat(gm_qat: fx.GraphModule) -> fx.GraphModule:
    """A PTQ-style simulation (exportable, ORT arithmetic) equal to the QAT graph in evaluation."""
    qp = _qat()
    gm = copy.deepcopy(gm_qat).eval()
    for _, q in list(qp.qat_quantizers(gm)):
        if q.is_weight:
            continue
        params = q.export_qparams()
        if params is None:
            raise ExportError(f"{q.name}: QAT algorithm {q.algorithm!r} has non-uniform levels (e.g. APoT); no "
                              "integer runtime executes them, so it cannot be exported")
        _replace(gm, q, _quantizer(q.ctx.scheme, q.qmin, q.qmax, params[0], params[1], False, q.name))
    for name, layer in list(qp.qat_layers(gm)):
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, _weight_layer(layer, name))
    gm.meta.pop("quantbench_qat", None)
    if gm.meta["quantbench"]["backend"].arithmetic == "onnxruntime":
        link_integer_arithmetic(gm)
    gm.recompile()
    return gm


def load_qat_run(path: str | Path) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The QAT graph saved by a ``quantbench qat`` run (``final.pt``, or its folder) and its config."""
    from quantbench.graph.quantize import all_quantizers, calibrate_weights, prepare
    from quantbench.models import build_model, get_entry
    from quantbench.qat.checkpoint import load_checkpoint
    from quantbench.qat.config import QATConfig

    p = Path(path)
    ckpt = load_checkpoint(p / "final.pt" if p.is_dir() else p)
    cfg = QATConfig.model_validate(ckpt["config"])
    entry = get_entry(cfg.model)
    spec = cfg.resolved_backend()
    model = build_model(cfg.model, None, cfg.width_mult, entry.num_classes)
    example = torch.zeros(1, *entry.input_size)
    w_obs, a_obs = cfg.observers()
    gm = prepare(model, spec, example, w_obs, a_obs, cfg.w_observer_options, cfg.a_observer_options)
    calibrate_weights(gm)  # gives per-channel parameters their shapes; the checkpoint holds the trained values
    for q in all_quantizers(gm):  # activation placeholders, overwritten by the checkpoint as well
        q.calibrated_t = torch.tensor(True)
    qp = _qat()
    qp.prepare_qat(gm, cfg.algorithm, cfg.bn_fold, "calibrator", cfg.algorithm_options, cfg.bn_freeze_step)
    try:
        gm.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ExportError(f"{p}: the QAT checkpoint does not match {cfg.model!r} rebuilt from its config: "
                          f"{str(exc).splitlines()[0]}") from exc
    config = {"model": cfg.model, "weights": cfg.weights, "width_mult": cfg.width_mult,
              "num_classes": entry.num_classes, "input_size": list(entry.input_size), "mean": list(entry.mean),
              "std": list(entry.std), "data": cfg.data, "w_observer": w_obs, "a_observer": a_obs,
              "qat": {"algorithm": cfg.algorithm, "bn_fold": cfg.bn_fold, "run": str(p)}}
    return gm.eval(), config
