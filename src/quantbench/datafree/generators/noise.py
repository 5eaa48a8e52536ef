"""``noise``: Gaussian images in the model's normalised input space (the baseline every data-free table needs)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from quantbench.datafree.generators.base import Generated, Generator, Target, register_generator


class NoiseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@register_generator
class NoiseGenerator(Generator):
    """N(0, 1) per pixel after normalisation: what the model sees for images with the training set's mean and
    standard deviation per channel and no structure."""

    name = "noise"
    options_type = NoiseOptions
    description = "Gaussian images with the model's input normalisation (the baseline)"

    def generate(self, target: Target, n: int, seed: int, progress: bool = True) -> Generated:
        gen = torch.Generator().manual_seed(seed)
        return Generated(torch.randn(n, *target.input_size, generator=gen), None, 0.0)
