"""The quantizer module inserted into graphs: an observer plus the quantization parameters it chose."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from quantbench.errors import QuantbenchError
from quantbench.observers import build_observer
from quantbench.quant.fake_quant import fake_quantize
from quantbench.quant.scheme import QScheme


class Quantizer(nn.Module):
    """Observes a tensor during calibration, then fake-quantizes it.

    Modes (independent flags): ``observing`` feeds inputs to the observer; ``quantizing`` applies
    fake quantization with the stored scale / zero-point. A fresh quantizer does neither until the
    graph's calibration switches it on.
    """

    def __init__(self, scheme: QScheme, observer: str, is_weight: bool = False, name: str = "",
                 observer_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        self.observer_name = observer
        self.is_weight = is_weight
        self.observer = build_observer(observer, scheme, is_weight=is_weight, **(observer_options or {}))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.qmin, self.qmax = scheme.qrange()
        self.observing = False
        self.quantizing = False
        self.calibrated = False
        self.set_name(name)

    def set_name(self, name: str) -> None:
        self.name = name
        self.observer.layer_name = name

    @property
    def axis(self) -> int | None:
        return self.scheme.ch_axis if self.scheme.per_channel else None

    def forward(self, x: Tensor) -> Tensor:
        if self.observing:
            self.observer.observe(x)
        if self.quantizing:
            if not self.calibrated:
                raise QuantbenchError(f"quantizer {self.name!r} was never calibrated: call compute_qparams()")
            return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
        return x

    @torch.no_grad()
    def compute_qparams(self) -> None:
        """Turn the observer's statistics into scale, zero-point and integer range."""
        scale, zp, self.qmin, self.qmax = self.observer.calculate_qparams()
        self.scale = scale.to(self.scale.device)
        self.zero_point = zp.to(self.scale.device)
        self.calibrated = True

    def reset_observer(self) -> None:
        self.observer = build_observer(self.observer_name, self.scheme, is_weight=self.is_weight)
        self.observer.layer_name = self.name

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def extra_repr(self) -> str:
        state = f"scale={self.scale.flatten()[:1].tolist()}" if self.calibrated else "uncalibrated"
        return f"{self.name}: {self.scheme.describe()}, {self.observer_name}, {state}"
