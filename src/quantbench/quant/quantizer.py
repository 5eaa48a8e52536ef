"""The one fake-quantizer of quantbench, used by PTQ, QAT, reconstruction and export.

A :class:`Quantizer` holds the scheme, the observer (calibration), the quantization parameters (scale,
zero-point, integer range) and optionally a learning rule (:mod:`quantbench.quant.learning`). Its life cycle:
observe -> :meth:`~Quantizer.compute_qparams` -> (optionally) :meth:`~Quantizer.enable_learning` and train ->
:meth:`~Quantizer.bake` -> export. The three switches (observing, quantizing, learning) are buffers, so they
travel with ``state_dict``, ``.to()`` and DDP's buffer broadcast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from quantbench.errors import QuantbenchError
from quantbench.observers import build_observer
from quantbench.quant.fake_quant import fake_quantize, quantize_div
from quantbench.quant.scheme import QScheme

if TYPE_CHECKING:
    from quantbench.quant.learning import Algorithm, LearningRule

_OBSERVING, _QUANTIZING, _LEARNING = 0, 1, 2


class Quantizer(nn.Module):
    """Observes a tensor during calibration, then fake-quantizes it (with a learning rule while learning).

    Modes (independent switches): ``observing`` feeds inputs to the observer; ``quantizing`` applies fake
    quantization; ``learning`` makes the hosted :attr:`rule` compute it (QAT, reconstruction) instead of the
    stored scale / zero-point. A fresh quantizer does none of these until calibration switches it on.
    ``onnx_rounding`` (set for backends simulated with ONNX Runtime's arithmetic) rounds ``x / s`` instead of
    ``x * (1 / s)`` at inference (no gradients); ``ort_int8`` says ONNX Runtime keeps this tensor in int8
    (set by :mod:`quantbench.graph.linking`).
    """

    def __init__(self, scheme: QScheme, observer: str, is_weight: bool = False, name: str = "",
                 observer_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        self.observer_name = observer
        self.observer_options = dict(observer_options or {})
        self.is_weight = is_weight
        self.observer = build_observer(observer, scheme, is_weight=is_weight, **self.observer_options)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        # the resolved integer range (adaptive signedness) travels with the state dict
        self.register_buffer("qrange_t", torch.tensor(scheme.qrange(), dtype=torch.int64))
        self.register_buffer("calibrated_t", torch.tensor(False))
        self.register_buffer("switches", torch.zeros(3, dtype=torch.bool))  # observing, quantizing, learning
        self._switch = [False, False, False]  # host copy: no device sync per forward
        self.rule: LearningRule | None = None
        self.onnx_rounding = False
        self.ort_int8 = False
        #: QDrop (reconstruction only): while learning, each element is returned unquantized with this probability
        self.drop_prob = 0.0
        self.set_name(name)

    # ------------------------------------------------------------------ switches
    def _set(self, i: int, on: bool) -> None:
        self._switch[i] = bool(on)
        self.switches[i] = bool(on)

    @property
    def observing(self) -> bool:
        return self._switch[_OBSERVING]

    @observing.setter
    def observing(self, on: bool) -> None:
        self._set(_OBSERVING, on)

    @property
    def quantizing(self) -> bool:
        return self._switch[_QUANTIZING]

    @quantizing.setter
    def quantizing(self, on: bool) -> None:
        self._set(_QUANTIZING, on)

    @property
    def learning(self) -> bool:
        return self._switch[_LEARNING]

    @learning.setter
    def learning(self, on: bool) -> None:
        if on and self.rule is None:
            raise QuantbenchError(f"quantizer {self.name!r} has no learning rule: call enable_learning() first")
        self._set(_LEARNING, on)

    # ------------------------------------------------------------------ naming and state
    def set_name(self, name: str, where: str = "") -> None:
        """Name the quantizer; ``where`` (e.g. "output of layer2.0.conv1") goes into error messages."""
        self.name = name
        self.where = where
        self.observer.layer_name = f"{name} ({where})" if where else name

    @property
    def calibrated(self) -> bool:
        return bool(self.calibrated_t)

    @property
    def qmin(self) -> int:
        return int(self.qrange_t[0])

    @property
    def qmax(self) -> int:
        return int(self.qrange_t[1])

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    @property
    def axis(self) -> int | None:
        return self.scheme.ch_axis if self.scheme.per_channel else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # per-channel scale / zero-point have one entry per channel once calibrated: take the saved shape
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._switch = [bool(v) for v in self.switches.tolist()]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self._switch[_OBSERVING]:
            self.observer.observe(x)
        if not self._switch[_QUANTIZING]:
            return x
        if self._switch[_LEARNING]:
            assert self.rule is not None
            if self.drop_prob > 0.0:
                return self.rule.quantize_dropping(x, self.drop_prob)
            return self.rule(x)
        if not self.calibrated:
            raise QuantbenchError(f"quantizer {self.name!r} was never calibrated: call compute_qparams()")
        if self.onnx_rounding and not torch.is_grad_enabled():
            return quantize_div(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def compute_qparams(self) -> None:
        """Turn the observer's statistics into scale, zero-point and integer range."""
        scale, zp, qmin, qmax = self.observer.calculate_qparams()
        self.set_qparams(scale, zp, qmin, qmax)

    @torch.no_grad()
    def set_qparams(self, scale: Tensor, zero_point: Tensor, qmin: int | None = None,
                    qmax: int | None = None) -> None:
        """Store quantization parameters (a calibration, a baked learning rule, a checkpoint)."""
        dev = self.scale.device
        if qmin is not None and qmax is not None:
            self.qrange_t = torch.tensor([qmin, qmax], dtype=torch.int64, device=dev)
        self.scale = scale.detach().reshape(-1).to(device=dev, dtype=torch.float32).clone()
        self.zero_point = torch.round(zero_point.detach().reshape(-1).to(torch.float32)).to(
            device=dev, dtype=torch.int32)
        self.calibrated_t = torch.tensor(True, device=dev)

    def reset_observer(self) -> None:
        self.observer = build_observer(self.observer_name, self.scheme, is_weight=self.is_weight,
                                       **self.observer_options)
        self.set_name(self.name, self.where)

    # ------------------------------------------------------------------ learning
    def enable_learning(self, algorithm: str | Algorithm, options: BaseModel | dict[str, Any] | None = None,
                        hardware: bool = True, init: Literal["calibrator", "paper"] = "calibrator",
                        init_scale: Tensor | None = None) -> LearningRule:
        """Host the learning rule of ``algorithm`` and switch learning on.

        ``init="calibrator"`` starts the rule from this quantizer's calibrated grid (seed 001 C.4; ``init_scale``
        replaces the scale, e.g. divided by a BN factor when the rule sees the unfolded weight); ``"paper"`` leaves
        it to the rule's own initialisation on the first batch.
        """
        from quantbench.quant.learning import ALGORITHMS, QuantizerContext

        alg = ALGORITHMS.get(algorithm) if isinstance(algorithm, str) else algorithm
        opts = options if isinstance(options, BaseModel) else alg.parse_options(options)
        rule = alg.build(QuantizerContext.from_quantizer(self, hardware), opts).to(self.scale.device)
        if init == "calibrator":
            if not self.calibrated:
                raise QuantbenchError(f"quantizer {self.name!r} must be calibrated before its learning rule "
                                      "starts from the calibration (init='calibrator')")
            rule.init_from_qparams(self.scale if init_scale is None else init_scale, self.zero_point)
        self.rule = rule
        self.quantizing = True
        self.learning = True
        return rule

    @torch.no_grad()
    def bake(self, scale: Tensor | None = None) -> None:
        """Write the grid the learning rule learned into the static scale and zero-point, and drop the rule.

        Afterwards the quantizer computes what the rule computed, as a PTQ quantizer (exportable). ``scale``
        replaces the rule's scale (e.g. multiplied by a BN factor folded after quantizing). Non-uniform levels
        (APoT) have no integer grid and are refused.
        """
        if self.rule is None:
            return
        qp = self.rule.export_qparams()
        if qp is None:
            why = self.rule.grid_refusal() or "has non-uniform levels (e.g. APoT)"
            raise QuantbenchError(f"{self.name}: learning rule {self.rule.algorithm!r} {why}; no integer runtime "
                                  "executes them, so it has no grid to bake or export")
        s, z = qp
        s = s.reshape(-1) if scale is None else scale.reshape(-1)
        self.set_qparams(s, z.reshape(-1).expand_as(s), self.rule.qmin, self.rule.qmax)
        self.rule = None
        self.learning = False

    def extra_repr(self) -> str:
        state = f"scale={self.scale.flatten()[:1].tolist()}" if self.calibrated else "uncalibrated"
        rule = f", learning {self.rule.algorithm}" if self.rule is not None else ""
        return f"{self.name}: {self.scheme.describe()}, {self.observer_name}, {state}{rule}"
