"""Dataset specs (``kind:PATH`` or ``digits``), the dataset registry and :func:`load_data`.

Kinds: ``cifar10:PATH`` (python-format batches, see :mod:`quantbench.data.cifar10`),
``imagefolder:PATH`` (class subfolders, ImageNet-val layout) and ``digits`` (scikit-learn's bundled
8x8 digits, no download). Images are normalized with the *model's* mean/std. Options of a kind follow the path
after ``?``: ``imagefolder:PATH?skip_unreadable`` skips (and counts) images that cannot be decoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import Dataset

from quantbench.data.loaders import TensorImageDataset
from quantbench.errors import ConfigError, DataError
from quantbench.utils.registry import Registry


@dataclass
class DataBundle:
    """Train and test splits; both yield ``(normalized float32 image (C, H, W), int label)``."""

    name: str
    train: Dataset[tuple[torch.Tensor, int]]
    test: Dataset[tuple[torch.Tensor, int]]
    num_classes: int
    calib_indices: list[int] | None


class DatasetBuilder(Protocol):
    """``builder(path, mean=..., std=..., input_size=..., augment=...) -> DataBundle``."""

    def __call__(
        self,
        path: Path | None,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        input_size: tuple[int, int, int],
        augment: bool,
    ) -> DataBundle: ...


@dataclass(frozen=True)
class DatasetKind:
    """A registered dataset kind: its builder, image channels and whether it takes a PATH."""

    name: str
    builder: DatasetBuilder
    channels: int
    needs_path: bool
    description: str
    options: tuple[str, ...] = ()  # flags the builder takes as keyword arguments (``kind:PATH?flag``)


class DataWarning(UserWarning):
    """Data that was loaded with something left out (e.g. unreadable images skipped)."""


DATASETS: Registry[DatasetKind] = Registry[DatasetKind]("dataset kind")


def register_dataset(name: str, *, channels: int, needs_path: bool, description: str,
                     options: tuple[str, ...] = ()):
    """Decorator on a :class:`DatasetBuilder`: register it as dataset kind ``name`` (``kind:PATH`` when
    ``needs_path``; ``options``: the ``?flag`` keywords the builder takes), returning the builder unchanged."""
    return DATASETS.register(
        name, wrap=lambda n, builder: DatasetKind(n, builder, channels, needs_path, description, options)
    )


def list_datasets(filter: str | list[str] | None = None, exclude: str | list[str] | None = None) -> list[str]:
    """Registered dataset kinds, sorted, optionally filtered by glob(s)."""
    return DATASETS.list(filter, exclude)


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """Split ``"kind:PATH"`` (or a bare ``"kind"``) into the kind and an expanded path."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"dataset spec must be a non-empty string like 'cifar10:PATH' or 'digits', got {spec!r}")
    kind, sep, path = spec.strip().partition(":")
    path = path.partition("?")[0]
    if not sep or not path:
        return kind.partition("?")[0], None
    return kind, Path(path).expanduser()


def spec_options(spec: str) -> tuple[str, ...]:
    """The ``?a,b`` flags after a dataset spec's path (``imagefolder:PATH?skip_unreadable``)."""
    _, sep, opts = spec.strip().partition("?")
    return tuple(o.strip() for o in opts.split(",") if o.strip()) if sep else ()


def load_data(
    spec: str,
    mean: Sequence[float],
    std: Sequence[float],
    input_size: Sequence[int],
    augment: bool = False,
) -> DataBundle:
    """Load the dataset ``spec``, normalized with the model's ``mean``/``std`` for ``input_size`` (C, H, W).

    ``augment`` turns on training-set augmentation (random crop + flip where it makes sense); the
    test split is never augmented.
    """
    kind_name, path = parse_spec(spec)
    kind = DATASETS.get(kind_name)
    size = tuple(int(v) for v in input_size)
    if len(size) != 3 or min(size) < 1:
        raise ConfigError(f"input_size must be (C, H, W) with positive entries, got {tuple(input_size)}")
    if len(mean) != size[0] or len(std) != size[0]:
        raise ConfigError(f"mean/std have {len(mean)}/{len(std)} entries but input_size {size} has {size[0]} channels")
    if kind.channels != size[0]:
        raise DataError(
            f"dataset {spec!r} has {kind.channels}-channel images but the model expects {size[0]} channels "
            f"(input_size {size}); pick a model whose input matches the data (e.g. digits_cnn for digits, "
            "a CIFAR ResNet or torchvision model for cifar10/imagefolder)"
        )
    if kind.needs_path and path is None:
        raise DataError(f"dataset kind {kind_name!r} needs a path: use '{kind_name}:PATH' ({kind.description})")
    if not kind.needs_path and path is not None:
        raise DataError(f"dataset kind {kind_name!r} takes no path: use plain '{kind_name}' instead of {spec!r}")
    if path is not None and not path.exists():
        raise DataError(f"dataset path {path} does not exist; expected {kind.description}")
    options = spec_options(spec)
    unknown = [o for o in options if o not in kind.options]
    if unknown:
        raise DataError(f"dataset kind {kind_name!r} has no option {unknown[0]!r}; its options: "
                        f"{', '.join(kind.options) or 'none'} (written kind:PATH?option)")
    return kind.builder(  # type: ignore[call-arg]
        path,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        input_size=(size[0], size[1], size[2]),
        augment=bool(augment),
        **{o: True for o in options},
    )


# --------------------------------------------------------------------------------------------- digits
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


@register_dataset("digits", channels=1, needs_path=False,
                  description="scikit-learn's bundled 8x8 digits (no path)")
def _build_digits(
    path: Path | None,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_size: tuple[int, int, int],
    augment: bool,
) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (pixels 0..16), stratified 80/20 split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype("float32")).unsqueeze(1)  # (1797, 1, 8, 8)
    labels = torch.from_numpy(digits.target.astype("int64"))
    idx_train, idx_test = train_test_split(
        list(range(len(labels))),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    size = (input_size[1], input_size[2])

    def split(idx: list[int], aug: bool) -> TensorImageDataset:
        t = torch.as_tensor(idx, dtype=torch.long)
        # digits: a 1-pixel shift, no flip (a mirrored digit is a different symbol)
        return TensorImageDataset.from_raw(
            images[t], labels[t], mean, std, scale=1.0 / 16.0, size=size, augment=aug, pad=1, flip=False
        )

    return DataBundle("digits", split(idx_train, augment), split(idx_test, False), 10, None)


# ---------------------------------------------------------------------------------------- imagefolder
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _eval_transform(mean: tuple[float, ...], std: tuple[float, ...], h: int, w: int) -> object:
    """Eval transform: resize to h/0.875 then center-crop when h >= 224, else resize to (h, w)."""
    from torchvision import transforms as T

    if min(h, w) >= 224:
        resize: list[object] = [T.Resize(round(min(h, w) / 0.875)), T.CenterCrop((h, w))]
    else:
        resize = [T.Resize((h, w))]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])


def _train_transform(mean: tuple[float, ...], std: tuple[float, ...], h: int, w: int) -> object:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop((h, w)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def read_image(path: str) -> object:
    """An RGB PIL image, decoded now; an unreadable file is a :class:`DataError` naming it (one line)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL.UnidentifiedImageError is an OSError
        why = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {why}); replace or remove it, or skip "
                        "unreadable images with imagefolder:PATH?skip_unreadable") from None


def _readable(path: str) -> bool:
    try:
        read_image(path)
    except DataError:
        return False
    return True


def _image_folder(root: Path, transform: object, skip_unreadable: bool = False) -> Dataset[tuple[torch.Tensor, int]]:
    """An ``ImageFolder`` whose unreadable images are a one-line error, or (``skip_unreadable``: every image is
    decoded once here) left out with a :class:`DataWarning` giving the count."""
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"imagefolder path {root} is not a directory; expected a folder of class subfolders")
    try:
        ds = ImageFolder(
            str(root),
            transform=transform,  # type: ignore[arg-type]
            loader=read_image,
            is_valid_file=lambda f: f.lower().endswith(IMG_EXTENSIONS),
        )
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(
            f"imagefolder path {root} is not in ImageFolder layout ({exc}); expected one subfolder per class "
            f"holding images ({', '.join(IMG_EXTENSIONS)}), e.g. {root}/n01440764/x.JPEG"
        ) from exc
    if skip_unreadable:
        bad = [p for p, _ in ds.samples if not _readable(p)]
        if bad:
            drop = set(bad)
            ds.samples = ds.imgs = [s for s in ds.samples if s[0] not in drop]
            ds.targets = [t for _, t in ds.samples]
            warnings.warn(f"skipped {len(bad)} unreadable image(s) of {len(ds.samples) + len(bad)} in {root} "
                          f"(first: {bad[0]})", DataWarning, stacklevel=2)
        if not ds.samples:
            raise DataError(f"imagefolder {root}: no readable image is left after skipping {len(bad)} unreadable")
    ds.skipped = len(bad) if skip_unreadable else 0  # type: ignore[attr-defined]
    return ds


@register_dataset(
    "imagefolder", channels=3, needs_path=True,
    description="a folder of class subfolders holding RGB images (ImageNet-val layout), optionally split into "
    "train/ and val/",
    options=("skip_unreadable",),
)
def _build_imagefolder(
    path: Path | None,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_size: tuple[int, int, int],
    augment: bool,
    skip_unreadable: bool = False,
) -> DataBundle:
    """Class-subfolder images. ``PATH/train`` + ``PATH/val`` (or ``test``) when present; otherwise PATH is
    used for both splits (ImageNet-val style; calibration then draws from evaluation images)."""
    assert path is not None
    _, h, w = input_size
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        train_root, test_root = path / "train", test_dir
    else:
        train_root = test_root = path
    eval_tf = _eval_transform(mean, std, h, w)
    test = _image_folder(test_root, eval_tf, skip_unreadable)
    train = (test if train_root == test_root and not augment
             else _image_folder(train_root, _train_transform(mean, std, h, w) if augment else eval_tf, skip_unreadable))
    classes = test.classes  # type: ignore[attr-defined]
    if train.classes != classes:  # type: ignore[attr-defined]
        raise DataError(
            f"imagefolder {path}: train and {test_root.name} have different class folders; "
            "make both hold the same class subfolders"
        )
    return DataBundle("imagefolder", train, test, len(classes), None)
