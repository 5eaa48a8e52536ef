"""The quantization scheme: a frozen, validated value type (seed 001 section E)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Signedness = Literal["signed", "unsigned", "adaptive"]
Granularity = Literal["per_tensor", "per_channel"]
ScaleType = Literal["float", "pow2"]


class QScheme(BaseModel):
    """How one tensor is quantized.

    ``signedness='adaptive'`` (academic setting only, seed 001 E) picks the unsigned range when the
    observed tensor is non-negative and the signed range otherwise. ``narrow_range`` drops the most
    negative signed integer (e.g. [-127, 127] at 8 bits); it does not change unsigned ranges.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: int = Field(8, ge=1, le=16)
    symmetric: bool = True
    signedness: Signedness = "signed"
    granularity: Granularity = "per_tensor"
    ch_axis: int = 0
    scale_type: ScaleType = "float"
    narrow_range: bool = False

    @model_validator(mode="after")
    def _check(self) -> QScheme:
        if self.narrow_range and self.bits < 2:
            raise ValueError("narrow_range needs bits >= 2 (a 1-bit narrow signed range is empty)")
        return self

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    def is_signed(self, observed_min: float | None = None) -> bool:
        """Resolve signedness; ``adaptive`` needs the observed minimum (signed when it is < 0)."""
        if self.signedness == "adaptive":
            return observed_min is None or observed_min < 0
        return self.signedness == "signed"

    def qrange(self, signed: bool | None = None) -> tuple[int, int]:
        """Integer range [N_min, N_max] (seed 001 E).

        unsigned: [0, 2^t - 1]; signed: [-2^(t-1), 2^(t-1) - 1], with -2^(t-1) + 1 when narrow.
        """
        if signed is None:
            signed = self.is_signed()
        t = self.bits
        if not signed:
            return 0, 2**t - 1
        qmin = -(2 ** (t - 1)) + (1 if self.narrow_range else 0)
        return qmin, 2 ** (t - 1) - 1

    def with_bits(self, bits: int) -> QScheme:
        """A copy at another bit-width."""
        return self.model_copy(update={"bits": bits}) if bits != self.bits else self

    def describe(self) -> str:
        """Short human-readable form, e.g. ``int8 sym per-channel``."""
        sign = {"signed": "s", "unsigned": "u", "adaptive": "s/u"}[self.signedness]
        parts = [
            f"{sign}{self.bits}",
            "sym" if self.symmetric else "asym",
            "per-channel" if self.per_channel else "per-tensor",
        ]
        if self.scale_type == "pow2":
            parts.append("pow2")
        if self.narrow_range:
            parts.append("narrow")
        return " ".join(parts)
