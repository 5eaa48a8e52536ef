"""The quantizer module inserted into graphs: an observer plus the quantization parameters it chose."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from quantbench.errors import QuantbenchError
from quantbench.observers import build_observer
from quantbench.quant.fake_quant import fake_quantize
from quantbench.quant.scheme import QScheme


def quantize_div(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                 axis: int | None = None) -> Tensor:
    """ONNX QuantizeLinear then DequantizeLinear: ``(clamp(rne(x / s) + z) - z) * s`` computed in float32.

    ONNX (and ONNX Runtime's MLAS kernel) divides by the scale; the fake quantizer multiplies by its
    reciprocal like torch's native kernels. The two differ by an ulp, which decides a rounding tie now
    and then; backends simulated with ONNX Runtime's arithmetic use this form at inference.
    """
    dt = x.dtype
    if axis is None or scale.numel() == 1:
        s = scale.reshape(()).to(torch.float32)
        z = zero_point.reshape(()).to(torch.float32)
    else:
        shape = [1] * x.dim()
        shape[axis] = -1
        s = scale.reshape(shape).to(torch.float32)
        z = zero_point.reshape(shape).to(torch.float32)
    qv = torch.div(x.to(torch.float32), s).round_().add_(z).clamp_(qmin, qmax)
    return qv.sub_(z).mul_(s).to(dt)


class Quantizer(nn.Module):
    """Observes a tensor during calibration, then fake-quantizes it.

    Modes (independent flags): ``observing`` feeds inputs to the observer; ``quantizing`` applies
    fake quantization with the stored scale / zero-point. A fresh quantizer does neither until the
    graph's calibration switches it on. ``onnx_rounding`` (set for backends simulated with ONNX
    Runtime's arithmetic) rounds ``x / s`` instead of ``x * (1 / s)`` at inference (no gradients).
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
        self.observing = False
        self.quantizing = False
        self.onnx_rounding = False
        self.set_name(name)

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # per-channel scale / zero-point have one entry per channel once calibrated: take the saved shape
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def axis(self) -> int | None:
        return self.scheme.ch_axis if self.scheme.per_channel else None

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observer.observe(x)
        if self.quantizing:
            if not self.calibrated:
                raise QuantbenchError(f"quantizer {self.name!r} was never calibrated: call compute_qparams()")
            if self.onnx_rounding and not torch.is_grad_enabled():
                return quantize_div(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
            return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
        return x

    @torch.no_grad()
    def compute_qparams(self) -> None:
        """Turn the observer's statistics into scale, zero-point and integer range."""
        scale, zp, qmin, qmax = self.observer.calculate_qparams()
        self.qrange_t = torch.tensor([qmin, qmax], dtype=torch.int64, device=self.scale.device)
        self.scale = scale.to(self.scale.device)
        self.zero_point = zp.to(self.scale.device)
        self.calibrated_t = torch.tensor(True, device=self.scale.device)

    def reset_observer(self) -> None:
        self.observer = build_observer(self.observer_name, self.scheme, is_weight=self.is_weight,
                                       **self.observer_options)
        self.set_name(self.name, self.where)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def extra_repr(self) -> str:
        state = f"scale={self.scale.flatten()[:1].tolist()}" if self.calibrated else "uncalibrated"
        return f"{self.name}: {self.scheme.describe()}, {self.observer_name}, {state}"
