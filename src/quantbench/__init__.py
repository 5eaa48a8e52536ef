"""quantbench: backend-faithful, fast and honestly comparable quantization of CNNs."""

__version__ = "0.1.0"
