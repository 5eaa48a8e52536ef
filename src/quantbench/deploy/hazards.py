"""Known ways ONNX Runtime's CPU int8 kernels can deviate from exact integer arithmetic.

On x86 CPUs with AVX2 but without VNNI, MLAS multiplies uint8 activations by int8 weights with
``vpmaddubsw``, which adds two products into a *saturating* int16 before widening. With 8-bit weights
``255 * 127 * 2 = 64770`` exceeds 32767, so a convolution output can come out wrong. ONNX Runtime's own
criterion (``Avx2WeightS8ToU8Transformer``) is a weight code outside [-64, 64]: 7-bit weights cannot
overflow (``255 * 64 * 2 = 32640``). Remedies: export with ``--reduce-range`` (7-bit weights, ORT's
quantize_static ``reduce_range``) or run ORT with ``session.x64quantprecision=1`` (int8 weights converted
to uint8 and run in the exact u8u8 kernel; slower). int8 activations are converted to uint8 first
(``QDQS8ToU8Transformer``), so they share the hazard.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

SAFE_WEIGHT = 64


@dataclass
class OverflowRisk:
    """Layers whose int8 weights can overflow the int16 pair sums of AVX2 u8 x s8 kernels."""

    layers: dict[str, int]  # layer -> number of weight codes outside [-64, 64]
    total_codes: int

    @property
    def at_risk(self) -> bool:
        return bool(self.layers)

    def to_dict(self) -> dict:
        return {**asdict(self), "at_risk": self.at_risk, "rule": f"int8 weight codes outside [-{SAFE_WEIGHT}, "
                f"{SAFE_WEIGHT}] on x86 AVX2 without VNNI"}


def weight_overflow_risk(weights: dict[str, np.ndarray]) -> OverflowRisk:
    """Count int8 weight codes outside [-64, 64] per layer (uint8 weights run in the exact u8u8 kernel)."""
    layers: dict[str, int] = {}
    total = 0
    for name, codes in weights.items():
        if codes.dtype != np.int8:
            continue
        total += codes.size
        n = int(np.count_nonzero((codes < -SAFE_WEIGHT) | (codes > SAFE_WEIGHT)))
        if n:
            layers[name] = n
    return OverflowRisk(layers, total)


@cache
def cpu_features() -> dict[str, bool | str]:
    """x86 SIMD features that decide which int8 kernels ONNX Runtime uses (Linux /proc/cpuinfo)."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)
    return {"cpu": model, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "vnni": vnni,
            "int16_overflow_possible": "avx2" in flags and not vnni}
