"""CIFAR-10 in the official python format, read with a restricted unpickler (no arbitrary code).

torchvision's ``CIFAR10`` md5-checks each batch against the full official files and refuses the
truncated subset in ../shared, so the pickles are read here directly. A pickle may only reference the
globals a numpy array needs; anything else raises :class:`DataError`.
"""

from __future__ import annotations

import codecs
import io
import json
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantbench.data.loaders import TensorImageDataset
from quantbench.data.registry import DataBundle, register_dataset
from quantbench.errors import DataError

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CALIB_FILE = "calib_train_indices_256.json"
NUM_CLASSES = 10


def _numpy_core() -> tuple[Any, Any]:
    """numpy's (multiarray, numeric) modules under numpy 2 (``numpy._core``) or 1.x (``numpy.core``)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


_MULTIARRAY, _NUMERIC = _numpy_core()

# Everything a pickled dict of numpy arrays / lists / bytes can reference, and nothing else:
# array reconstruction (protocols 2-4), buffer-based arrays (protocol 5), dtypes, numpy scalars, and
# the pure functions Python 3 uses to pickle bytes/bytearray at protocol 2.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _MULTIARRAY._reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _MULTIARRAY.scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _NUMERIC._frombuffer for core in ("core", "_core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytearray"): bytearray,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals needed to rebuild arrays."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global; refuse everything else with :class:`DataError`."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: CIFAR-10 batches may only contain numpy arrays, "
                "lists and strings (this file is not a genuine CIFAR-10 batch, or was tampered with)"
            ) from None


def restricted_load(data: bytes) -> Any:
    """Unpickle ``data`` (python-2 pickles: ``encoding='bytes'``) with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, 3072), labels int64 (N,)) from one batch file."""
    try:
        obj = restricted_load(path.read_bytes())
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:
        raise DataError(
            f"cannot read CIFAR-10 batch {path}: {type(exc).__name__}: {exc}; expected a python-format "
            "pickle (the 'CIFAR-10 python version' archive, extracted)"
        ) from exc
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels', got {keys}")
    data, labels = obj[b"data"], np.asarray(obj[b"labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        shape = getattr(data, "shape", None)
        raise DataError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {type(data).__name__} {shape}")
    if (
        labels.shape != (data.shape[0],)
        or not np.issubdtype(labels.dtype, np.integer)
        or (labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES))
    ):
        raise DataError(
            f"{path}: b'labels' must hold {data.shape[0]} integers in [0, {NUM_CLASSES}), got "
            f"{labels.dtype} shape {labels.shape}"
            + (f" ranging {labels.min()}..{labels.max()}" if labels.size and labels.dtype.kind in "iu" else "")
        )
    return data, labels.astype(np.int64)


def find_batches_dir(path: Path) -> Path:
    """``PATH/cifar-10-batches-py`` or PATH itself when it holds the batch files."""
    if (path / BATCHES_DIR).is_dir():
        return path / BATCHES_DIR
    if (path / TEST_FILE).is_file() or (path / TRAIN_FILES[0]).is_file():
        return path
    raise DataError(
        f"no CIFAR-10 batches under {path}: expected {path}/{BATCHES_DIR}/ (or that folder itself) holding "
        f"{', '.join(TRAIN_FILES)} and {TEST_FILE}; extract cifar-10-python.tar.gz there"
    )


@lru_cache(maxsize=4)
def _read_all(batches_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folder = Path(batches_dir)
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; it needs all of "
            f"{', '.join(TRAIN_FILES)} and {TEST_FILE}"
        )
    parts = [_read_batch(folder / f) for f in TRAIN_FILES]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _read_batch(folder / TEST_FILE)
    for a in (x_train, y_train, x_test, y_test):
        a.setflags(write=False)
    return x_train, y_train, x_test, y_test


def read_cifar10(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw ``(x_train, y_train, x_test, y_test)``: uint8 images (N, 3, 32, 32), int64 labels.

    The arrays are cached per folder and read-only.
    """
    folder = find_batches_dir(Path(path)).resolve()
    x_train, y_train, x_test, y_test = _read_all(str(folder))
    return x_train.reshape(-1, 3, 32, 32), y_train, x_test.reshape(-1, 3, 32, 32), y_test


def read_calib_indices(path: Path, n_train: int) -> list[int] | None:
    """The ``"indices"`` of ``calib_train_indices_256.json`` next to the batches folder, if present."""
    file = find_batches_dir(path).parent / CALIB_FILE
    if not file.is_file():
        return None
    try:
        indices = json.loads(file.read_text())["indices"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{file} is not valid: expected JSON with an 'indices' list ({exc})") from exc
    if not isinstance(indices, list) or not all(isinstance(i, int) and 0 <= i < n_train for i in indices):
        raise DataError(f"{file}: 'indices' must be a list of integers in [0, {n_train})")
    return indices


@register_dataset(
    "cifar10", channels=3, needs_path=True,
    description=f"a folder containing {BATCHES_DIR}/ (python-format CIFAR-10 batches) or that folder itself",
)
def _build_cifar10(
    path: Path | None,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_size: tuple[int, int, int],
    augment: bool,
) -> DataBundle:
    """CIFAR-10 from PATH; ``augment`` adds random 4-pixel-pad crops and horizontal flips to train."""
    assert path is not None
    x_train, y_train, x_test, y_test = read_cifar10(path)
    size = (input_size[1], input_size[2])

    def make(x: np.ndarray, y: np.ndarray, aug: bool) -> TensorImageDataset:
        return TensorImageDataset.from_raw(
            torch.from_numpy(x.copy()), torch.from_numpy(y.copy()), mean, std, 1.0 / 255.0, size, aug, 4, True
        )

    return DataBundle(
        "cifar10",
        make(x_train, y_train, augment),
        make(x_test, y_test, False),
        NUM_CLASSES,
        read_calib_indices(path, len(y_train)),
    )
