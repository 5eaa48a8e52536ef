"""Post-training quantization: calibration, BN re-calibration, evaluation."""

from quantbench.ptq.calibrate import bn_recalibrate, calibrate
from quantbench.ptq.evaluate import EvalResult, compare, predict
from quantbench.ptq.pipeline import PTQResult, run_ptq

__all__ = ["EvalResult", "PTQResult", "bn_recalibrate", "calibrate", "compare", "predict", "run_ptq"]
