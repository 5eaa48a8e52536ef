"""LSQ+: LSQ with a learnable zero-point for asymmetric schemes (Bhalgat et al. 2020; seed 001 F)."""

from __future__ import annotations

from torch import Tensor

from quantbench.qat.quantizers.lsq import LSQOptions, LSQQuantizer
from quantbench.quant.learning import Algorithm, register_algorithm
from quantbench.quant.ste import round_ste


class LSQPlusQuantizer(LSQQuantizer):
    """LSQ whose zero-point is a learnable parameter in asymmetric schemes.

    The forward uses the zero-point rounded to an integer (``round(clamp(z, N_min, N_max))``, passed
    straight through), as deployable integer grids need, so ``d x_hat / d z`` is 0 inside the range and
    ``-s`` outside; the zero-point gradient is scaled like the step size's. Symmetric schemes behave as
    LSQ. LSQ+ initialises from MeanStd (weights) and MSE (activations) calibrators by default.
    """

    algorithm = "lsq+"
    learn_zero_point = True

    def effective_zero_point(self) -> Tensor:
        if self.ctx.scheme.symmetric:
            return self.zero_point
        return round_ste(self.zero_point.clamp(self.qmin, self.qmax))


register_algorithm(Algorithm(
    "lsq+", LSQPlusQuantizer, LSQPlusQuantizer, LSQOptions,
    description="LSQ with a learnable zero-point for asymmetric schemes (LSQ+)",
    default_observers=("meanstd", "mse"),
))
