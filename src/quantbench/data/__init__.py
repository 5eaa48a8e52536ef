"""Datasets (CIFAR-10, ImageFolder, scikit-learn digits), calibration subsets and loaders."""

from quantbench.data import cifar10  # noqa: F401  (registers the cifar10 kind)
from quantbench.data.loaders import (
    CalibrationSizeError,
    TensorImageDataset,
    augment_batch,
    calibration_subset,
    make_loader,
)
from quantbench.data.registry import (
    DATASETS,
    DataBundle,
    DatasetKind,
    list_datasets,
    load_data,
    parse_spec,
    register_dataset,
)

__all__ = [
    "DATASETS",
    "CalibrationSizeError",
    "DataBundle",
    "DatasetKind",
    "TensorImageDataset",
    "augment_batch",
    "calibration_subset",
    "list_datasets",
    "load_data",
    "make_loader",
    "parse_spec",
    "register_dataset",
]
