"""Quantization-aware training: learnable fake quantizers, BN-folding strategies, the unified recipe."""
