"""One PTQ run end to end: load, prepare for the backend, calibrate, evaluate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, fx, nn

from quantbench.config import PTQConfig, QuantRunConfig
from quantbench.data import DataBundle, TensorImageDataset, calibration_subset, load_data, make_loader
from quantbench.datafree.source import SourceImages, make_images, parse_data_source
from quantbench.graph.quantize import list_layers, list_quantizers, prepare
from quantbench.models import build_model, get_entry
from quantbench.ptq.calibrate import bn_recalibrate, calibrate
from quantbench.ptq.evaluate import compare, predict
from quantbench.recon.reconstruct import reconstruct


@dataclass
class PTQContext:
    """What several runs on the same model and data share: the float model, data and FP predictions."""

    key: tuple[Any, ...]
    model: nn.Module
    bundle: DataBundle
    example: Tensor
    fp_pred: Tensor
    labels: Tensor
    test_loader: Any


@dataclass
class PTQResult:
    model: str
    backend: str
    w_bits: int
    a_bits: int
    w_observer: str
    a_observer: str
    fp_top1: float
    quant_top1: float
    agreement: float
    calib_seconds: float
    n_test: int
    n_calib: int
    bn_calib: bool
    first_last: str
    residual: str
    skip: str
    n_quantizers: int
    device: str
    weights: str | None = None
    data: str = ""
    method: str = "nearest"  # the weights' rounding: nearest, or the reconstruction method
    recon_seconds: float | None = None  # reconstruction wall time (None: no reconstruction)
    calib_data: str = "real"  # where calibration / reconstruction images came from
    layers: list[dict[str, Any]] = field(default_factory=list)  # per conv/linear layer: name, bits, kept float
    extra: dict[str, Any] = field(default_factory=dict)
    #: The prepared and calibrated graph (so callers such as the sweep's cards need not prepare again);
    #: not part of :meth:`to_dict`.
    graph: fx.GraphModule | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, graph=None))
        del out["graph"]
        return out


def context_key(cfg: QuantRunConfig) -> tuple[Any, ...]:
    """What a :class:`PTQContext` depends on: runs with equal keys can share one."""
    return (cfg.model, cfg.weights, cfg.data, cfg.width_mult, cfg.device, cfg.eval_batch_size, cfg.max_test)


def build_context(cfg: QuantRunConfig, progress: bool = True) -> PTQContext:
    """Load the float model and data, and the float model's predictions on the test set."""
    entry = get_entry(cfg.model)
    bundle = load_data(cfg.data, entry.mean, entry.std, entry.input_size)
    model = build_model(cfg.model, cfg.weights, cfg.width_mult, num_classes=bundle.num_classes)
    model = model.to(cfg.device).eval()
    test = bundle.test
    if cfg.max_test is not None and cfg.max_test < len(test):  # type: ignore[arg-type]
        test = torch.utils.data.Subset(test, range(cfg.max_test))
    loader = make_loader(test, cfg.eval_batch_size)
    fp_pred, labels = predict(model, loader, cfg.device, progress, "evaluating FP32")
    example = bundle.test[0][0].unsqueeze(0).to(cfg.device)
    return PTQContext(context_key(cfg), model, bundle, example, fp_pred, labels, loader)


def _images(dataset: Any) -> Tensor:
    """The images of a (sub)dataset as one tensor (N, C, H, W)."""
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


@dataclass
class RunImages:
    """The images one run calibrates, re-calibrates BN and reconstructs on: the dataset's training split, or a
    noise / synthetic set (:mod:`quantbench.datafree`) made once for the largest of those needs."""

    cfg: PTQConfig
    context: PTQContext
    made: SourceImages | None = None

    def calibration(self) -> Any:
        if self.made is None:
            return calibration_subset(self.context.bundle, self.cfg.calib_size, self.cfg.seed)
        return self.made.dataset(self.cfg.calib_size)

    def bn_calibration(self, calib_set: Any) -> Any:
        """The BN re-calibration images: a noise / synthetic set's own, or real ones (:func:`bn_calibration_set`)."""
        if self.made is not None:
            return self.made.dataset(self.cfg.bn_calib_size or self.cfg.calib_size)
        return bn_calibration_set(self.cfg, self.context.bundle, calib_set, tuple(self.context.example.shape[1:]))

    def reconstruction(self) -> Tensor:
        if self.made is None:
            return _images(calibration_subset(self.context.bundle, self.cfg.recon.recon_size, self.cfg.seed))
        return self.made.images[:self.cfg.recon.recon_size]


def bn_calibration_set(cfg: PTQConfig, bundle: DataBundle, calib_set: Any, input_size: tuple[int, ...]) -> Any:
    """Real BN re-calibration images: the calibration images (or ``bn_calib_size`` others) under the training
    augmentation unless ``bn_calib_augment`` is off. Un-augmented images describe another distribution than the
    one BN was trained on: on ResNet-20 they cost academic W8A8 4.7 points (92.06 -> 87.34), while augmented ones
    lift tensorrt W4A4 from 69.10 to 79.61."""
    n_bn = cfg.bn_calib_size or cfg.calib_size
    seed = cfg.seed if n_bn == cfg.calib_size else cfg.seed + 1  # the same size: the calibration's own indices
    if not cfg.bn_calib_augment:
        return calib_set if n_bn == cfg.calib_size else calibration_subset(bundle, n_bn, seed)
    if not isinstance(bundle.train, TensorImageDataset):  # image folders: load the training transform
        entry = get_entry(cfg.model)
        bundle = load_data(cfg.data, entry.mean, entry.std, input_size, augment=True)
    return calibration_subset(bundle, n_bn, seed, augment=True)


def run_images(cfg: PTQConfig, context: PTQContext, progress: bool) -> RunImages:
    """The run's image source; noise / synthetic sets are made (or read from the cache) here."""
    src = parse_data_source(cfg.calib_data)
    if src.kind == "real":
        return RunImages(cfg, context)
    need = max(cfg.calib_size, (cfg.bn_calib_size or cfg.calib_size) if cfg.bn_calib else 0,
               cfg.recon.recon_size if cfg.method != "nearest" else 0)
    entry = get_entry(cfg.model)
    made = make_images(src, context.model, tuple(context.example.shape[1:]), context.bundle.num_classes, need,
                       cfg.seed, cfg.device, progress, cfg.synthetic_options, entry.mean, entry.std)
    return RunImages(cfg, context, made)


def run_ptq(cfg: PTQConfig, progress: bool = True, context: PTQContext | None = None,
            keep_quantizers: bool = False) -> PTQResult:
    """Run one PTQ configuration: calibrate, optionally re-calibrate BN, optionally reconstruct (in that order).
    Pass ``context`` to reuse a loaded model and data across runs; ``keep_quantizers`` adds every quantizer's
    scheme, scale and zero-point to ``result.extra``."""
    torch.manual_seed(cfg.seed)
    spec = cfg.resolved_backend()
    if context is None or context.key != context_key(cfg):
        context = build_context(cfg, progress)
    gm = prepare(context.model, spec, context.example, cfg.w_observer, cfg.a_observer,
                 cfg.w_observer_options, cfg.a_observer_options)
    data = run_images(cfg, context, progress)
    calib_set = data.calibration()
    calib_loader = make_loader(calib_set, cfg.calib_batch_size)
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    calibrate(gm, calib_loader, cfg.device, progress)
    if cfg.bn_calib:
        bn_recalibrate(gm, make_loader(data.bn_calibration(calib_set), cfg.calib_batch_size), cfg.device, progress)
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    calib_seconds = time.perf_counter() - t0
    recon_seconds: float | None = None
    extra: dict[str, Any] = {}
    if data.made is not None:
        extra["data_source"] = data.made.card()
    if cfg.method != "nearest":
        report = reconstruct(gm, data.reconstruction(), cfg.method, cfg.recon, cfg.device, progress)
        recon_seconds = report.seconds
        extra["reconstruction"] = asdict(report)
    q_pred, _ = predict(gm, context.test_loader, cfg.device, progress, "evaluating quantized")
    ev = compare(context.fp_pred, q_pred, context.labels)
    p = spec.placement
    quantizers = list_quantizers(gm)
    if keep_quantizers:
        extra["quantizers"] = [
            {**asdict(q), "scheme": q.scheme.describe()} for q in quantizers
        ]
    return PTQResult(
        model=cfg.model, backend=spec.name, w_bits=spec.weight.bits, a_bits=spec.activation.bits,
        w_observer=cfg.w_observer, a_observer=cfg.a_observer, fp_top1=ev.fp_top1,
        quant_top1=ev.quant_top1, agreement=ev.agreement, calib_seconds=calib_seconds, n_test=ev.n,
        n_calib=len(calib_set), bn_calib=cfg.bn_calib, first_last=str(spec.first_last),
        residual="quantized" if p.mode == "outputs" and p.add_output else "fp",
        skip="quantized" if p.mode == "outputs" and p.add_inputs else "fp",
        n_quantizers=len(quantizers), device=cfg.device, weights=cfg.weights, data=cfg.data, method=cfg.method,
        recon_seconds=recon_seconds, calib_data=cfg.calib_data,
        layers=[asdict(layer) for layer in list_layers(gm)], extra=extra, graph=gm,
    )
