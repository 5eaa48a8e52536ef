"""``zeroq``: ZeroQ's distilled data (Cai et al. 2020; amirgholami/ZeroQ ``distill_data.py``).

From Gaussian noise, minimise over the pixels the distance between each image's per-channel statistics at
every BN input and the BN's running statistics, plus the input's own statistics against N(0, 1):
``sum_l ||mu_l - mu_BN||^2 / B + ||sigma_l - sigma_BN||^2 / B``. No labels, no cross-entropy. Adam lr 0.5,
ReduceLROnPlateau (min lr 1e-4, patience 100), 500 iterations per batch of 32.
"""

from __future__ import annotations

from torch import Tensor

from quantbench.datafree.bns import BNSHooks, input_loss
from quantbench.datafree.generators.base import (
    Generated,
    Generator,
    GeneratorOptions,
    Target,
    optimise_images,
    register_generator,
)


@register_generator
class ZeroQGenerator(Generator):
    name = "zeroq"
    options_type = GeneratorOptions
    description = "ZeroQ: per-image BN statistics matched to the running statistics, from noise, no labels"

    def generate(self, target: Target, n: int, seed: int, progress: bool = True) -> Generated:
        hooks = BNSHooks(target.model, "per_image")
        opts = self.options
        assert isinstance(opts, GeneratorOptions)

        def loss(x: Tensor, _: int) -> Tensor:
            hooks.reset()
            target.model(x)
            return hooks.loss() + input_loss(x)

        with hooks.active():
            return optimise_images(target, n, opts, seed, progress, "zeroq", loss, None)
