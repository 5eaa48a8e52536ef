"""Data-free quantization: images made from the float model's BatchNorm statistics (seed 000's family)."""

from quantbench.datafree.source import DataSource, SourceImages, make_images, parse_data_source

__all__ = ["DataSource", "SourceImages", "make_images", "parse_data_source"]
