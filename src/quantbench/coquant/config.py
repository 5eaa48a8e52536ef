"""The CoQuant run configuration: a QAT configuration plus the bit-width set, teacher selection and Swap.

Defaults follow seed 002 Table 2 (CIFAR-10 ResNet: p1 0.9, lambda 0.001, PACT activations with DoReFa-style weights)
where they apply to quantbench's scaled protocol; the learning rate, epochs and initialisation are QAT's (the seed
trains 350 epochs from scratch at lr 0.1, which a pretrained network fine-tuned for a few epochs does not survive):
the card states both.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from quantbench.errors import ConfigError
from quantbench.qat.config import QATConfig

#: where seed 002's supplement is silent, the choice quantbench made (each an option; written on the card)
INTERPRETATIONS = {
    "teacher_score": "confidence(t) - lambda * distance(t, b): confidence = mean softmax probability of the true "
                     "class under t on the batch; distance = sum over quantized layers of ||Q_t(W) - Q_b(W)||^2 "
                     "(option distance: kl, the KL between the two precisions' outputs)",
    "swap": "per block of the reconstruction partition: block l keeps the student's precision with probability "
            "p1 + (1 - p1) l / (L - 1); p1 rises linearly to 1 over training",
    "kl": "temperature 1 (option), teacher outputs detached; y_t is the teacher's own output at its turn",
    "bn": "switchable BN (one per trained bit-width); swapped-in teacher blocks use their running statistics; an "
          "unseen bit-width gets a fresh BN (affine copied from the nearest trained one) calibrated on N training "
          "images under the training augmentation (option bn_calib_augment; US-Nets / AdaBits calibrate on the "
          "training loader)",
    "zero_shot_ranges": "an unseen bit-width's clipping values start linear in bit-width between its trained "
                        "neighbours' (the nearest trained one's outside B; option zero_shot_ranges: nearest)",
    "alpha": "one PACT clipping value per bit-width (AdaBits' switch_alpha)",
}


def bit_set(bits: list[int]) -> list[int]:
    """``bits`` checked (2..8) and sorted highest first, without repeats."""
    bad = [b for b in bits if not 2 <= b <= 8]
    if bad:
        raise ValueError(f"CoQuant bit-widths must be in 2..8 (signed 1-bit grids are refused; export holds 8 "
                         f"bits), got {bad}")
    return sorted(set(bits), reverse=True)


class CoQuantConfig(QATConfig):
    """Everything a CoQuant run needs (QAT's fields, the academic setting, PACT by default)."""

    algorithm: str = "pact"
    bn_fold: int = Field(0, ge=0, le=4, description="unused: CoQuant keeps BN unfolded (the academic setting)")
    bits: list[int] = Field(default_factory=lambda: [8, 4, 2], min_length=1, description="the trained set B")
    eval_bits: list[int] = Field(default_factory=list, description="bit-widths evaluated after training (default: "
                                                                   "every one from max(B) down to min(B))")
    p1: float = Field(0.9, ge=0, le=1, description="initial keep-probability of the first block (seed 002 Table 2)")
    lam: float = Field(0.001, ge=0, description="lambda of the teacher score (Table 2)")
    distance: Literal["weights", "kl"] = "weights"
    temperature: float = Field(1.0, gt=0)
    teacher: Literal["dynamic", "recursive", "none"] = Field(
        "dynamic", description="dynamic: seed 002's selection and Swap; recursive: Any-Precision DNNs' (each bit "
                               "from the next higher, no swap); none: cross-entropy at every bit")
    ramp_epochs: float = Field(0.0, ge=0, description="deviation from Algorithm 1 (0: off): ramp the lower "
                                                       "precisions' losses from 0 to 1 over these epochs")
    bn_calib_size: int = Field(256, ge=1, description="images calibrating the BN of an unseen bit-width")
    bn_calib_augment: bool = Field(True, description="calibrate BN on training images under the training "
                                                     "augmentation (the distribution BN was trained on); false: "
                                                     "un-augmented images")
    zero_shot_ranges: Literal["linear", "nearest"] = Field(
        "linear", description="an unseen bit-width's clipping values: linear in bit-width between the trained "
                              "neighbours, or the nearest trained bit-width's")
    bn_init: bool = Field(True, description="QAT's bn_init, on by default here, and for every trained bit-width")
    bn_recalibrate: bool = Field(False, description="also re-estimate the trained bit-widths' BN statistics on "
                                                    "those images before evaluating (seed 001 C.3)")

    @field_validator("bits", "eval_bits")
    @classmethod
    def _bits(cls, v: list[int]) -> list[int]:
        return bit_set(v)

    @model_validator(mode="after")
    def _backend_bits(self) -> CoQuantConfig:
        if self.w_bits is not None or self.a_bits is not None:
            raise ValueError("give the bit-widths with bits (the set B), not w_bits / a_bits")
        return self

    def check(self) -> CoQuantConfig:
        super().check()
        if self.resolved_backend().fold_bn:
            raise ConfigError(f"CoQuant switches BatchNorm per bit-width, so BN stays unfolded: backend "
                              f"{self.backend!r} folds BN; use --backend academic (export at one bit-width folds "
                              "that bit's BN afterwards)")
        return self

    def resolved_backend(self) -> Any:
        """The backend at B's highest precision (the graph is prepared there; the others switch on top of it)."""
        return self.backend_at(max(self.bits))

    def backend_at(self, bits: int) -> Any:
        """The run's backend spec with weights and activations at ``bits`` (policies and overrides kept)."""
        from quantbench.backends import load_backend

        try:
            return load_backend(self.backend).configure(
                w_bits=bits, a_bits=bits, first_last=self.first_last, residual=self.residual, skip=self.skip,
                overrides=self.overrides)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def interpretations(self) -> dict[str, str]:
        """The interpretations in force (:data:`INTERPRETATIONS`) with the option values this run chose."""
        keys = list(INTERPRETATIONS) if self.teacher == "dynamic" else ["kl", "bn", "zero_shot_ranges", "alpha"]
        if self.teacher == "none":
            keys.remove("kl")
        chosen = {"teacher_score": f"lambda {self.lam}, distance {self.distance}",
                  "swap": f"p1 {self.p1}", "kl": f"temperature {self.temperature}",
                  "bn": f"bn_calib_size {self.bn_calib_size}, bn_calib_augment {self.bn_calib_augment}",
                  "zero_shot_ranges": f"zero_shot_ranges {self.zero_shot_ranges}", "alpha": f"{self.algorithm}"}
        return {k: f"{INTERPRETATIONS[k]} [this run: {chosen[k]}]" for k in keys}

    def evaluated_bits(self) -> list[int]:
        return self.eval_bits or list(range(max(self.bits), min(self.bits) - 1, -1))
