"""Reconstruction methods (a registry) and their options, with the reference defaults and the CPU preset.

Defaults follow the public reference code (methods.md 1.2): 1024 images, batch 32, lambda 0.01 on the
channel-summed squared error, beta 20 -> 2 after a 0.2 warm-up, Adam at its default lr (1e-3) on ``V``,
activation steps by Adam with cosine decay to 0. The iteration count is a preset chosen by device when not
given: 20 000 per unit on CUDA (the papers'), 1 000 on the CPU (stated on the card).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantbench.recon.units import Granularity
from quantbench.utils.registry import Registry

GPU_ITERS = 20_000
CPU_ITERS = 1_000


@dataclass(frozen=True)
class ReconMethod:
    """What a reconstruction method learns, per which unit.

    ``weights``: AdaRound's rounding. ``activations``: ``"none"`` (activation quantizers keep their
    calibration), ``"after"`` (BRECQ: a second phase learns the steps with the rounding fixed) or ``"joint"``
    (QDrop: rounding and steps together). ``drop``: QDrop's random dropping of activation quantization.
    """

    name: str
    granularity: Granularity
    weights: bool
    activations: Literal["none", "after", "joint"]
    drop: bool
    description: str


RECON_METHODS: Registry[ReconMethod] = Registry("reconstruction method")
for _m in (
    ReconMethod("adaround", "layer", True, "none", False,
                "AdaRound (Nagel et al. 2020): learned rounding per layer, quantized input, float target after "
                "the layer's activation (asymmetric reconstruction)"),
    ReconMethod("brecq", "block", True, "after", False,
                "BRECQ (Li et al. 2021): learned rounding per block, then the block's activation steps (LSQ)"),
    ReconMethod("qdrop", "block", True, "joint", True,
                "QDrop (Wei et al. 2022): rounding and activation steps per block, activation quantization "
                "randomly dropped"),
):
    RECON_METHODS.add(_m.name, _m)


def list_recon_methods() -> list[str]:
    return RECON_METHODS.list()


class ReconOptions(BaseModel):
    """Hyper-parameters of reconstruction (every method reads the ones it uses)."""

    model_config = ConfigDict(extra="forbid")

    iters: int | None = Field(None, ge=1, description=f"iterations per unit (None: {GPU_ITERS} on cuda, "
                                                       f"{CPU_ITERS} on cpu)")
    recon_size: int = Field(1024, ge=1, description="training images reconstruction learns from")
    batch_size: int = Field(32, ge=1)
    drop_prob: float = Field(0.5, ge=0.0, le=1.0, description=(
        "QDrop: probability that an activation quantizer returns its float input (and that a unit input is "
        "the float network's) during reconstruction. The reference code's `prob` is the probability of "
        "KEEPING quantization: drop_prob = 1 - prob"))
    round_weight: float = Field(0.01, ge=0.0, description="lambda of the rounding regulariser")
    warmup: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of iterations without the regulariser")
    b_start: float = Field(20.0, gt=0.0)
    b_end: float = Field(2.0, gt=0.0)
    lr_w: float = Field(1e-3, gt=0.0, description="Adam lr of the rounding variables")
    lr_a: float | None = Field(None, gt=0.0, description=(
        "Adam lr of the activation steps, cosine to 0 (None: 4e-5 as QDrop at 20 000 iterations, "
        "scaled by 20 000 / iters below that, at most 4e-4 as BRECQ's script)"))
    p: float = Field(2.0, gt=0.0, description="exponent of the reconstruction loss")
    p_act: float = Field(2.4, gt=0.0, description="BRECQ's exponent in its activation phase")
    iters_a: int | None = Field(None, ge=1, description="BRECQ's activation phase iterations (None: iters / 4)")
    brecq_variant: Literal["two_phase", "joint"] = Field(
        "two_phase", description="BRECQ: activation steps after the rounding (reference) or jointly with it")
    cache_dtype: Literal["float32", "float16"] = "float32"
    cache_on_device: bool = Field(False, description="keep cached unit inputs on the GPU instead of the CPU")
    cache_dir: str | None = Field(None, description=(
        "spill cached tensors to memory-mapped files in this folder (large models); removed as soon as mapped"))
    bf16: bool = Field(False, description="bf16 autocast of the unit forward (GPU)")
    fused: bool | None = Field(None, description=(
        "torch.compile-fused LSQ / QDrop activation kernels (None: on where they compile here; the op-by-op "
        "kernels otherwise; the first call compiles, about 10 s on the CPU)"))
    granularity: Granularity | None = Field(None, description="unit granularity (None: the method's)")

    def resolved_iters(self, device: str) -> int:
        return self.iters or (GPU_ITERS if device == "cuda" else CPU_ITERS)

    def preset(self, device: str) -> str:
        """How the iteration count was chosen, for cards and tables."""
        if self.iters is not None:
            return f"{self.iters} iterations per unit (given)"
        return f"{self.resolved_iters(device)} iterations per unit ({'GPU' if device == 'cuda' else 'CPU'} preset)"

    def resolved_lr_a(self, iters: int) -> float:
        if self.lr_a is not None:
            return self.lr_a
        return min(4e-5 * GPU_ITERS / iters, 4e-4)
