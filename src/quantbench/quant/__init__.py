"""Quantization numerics: schemes, quantization parameters and fake quantization."""

from quantbench.quant.fake_quant import dequantize, fake_quantize, quantize
from quantbench.quant.qparams import qparams_from_range
from quantbench.quant.scheme import QScheme

__all__ = ["QScheme", "dequantize", "fake_quantize", "qparams_from_range", "quantize"]
