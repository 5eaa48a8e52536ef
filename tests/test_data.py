"""Datasets: CIFAR-10 pickles (restricted unpickler), ImageFolder, digits, calibration subsets, loaders."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from quantbench.data import (
    DATASETS,
    CalibrationSizeError,
    DataBundle,
    TensorImageDataset,
    augment_batch,
    calibration_subset,
    load_data,
    make_loader,
)
from quantbench.errors import ConfigError, DataError, EmptyCalibrationError, UnknownNameError

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_DIR = SHARED / "data" / "cifar10"
BATCHES = CIFAR_DIR / "cifar-10-batches-py"
needs_shared = pytest.mark.skipif(
    not BATCHES.is_dir(), reason=f"shared CIFAR-10 subset not found at {BATCHES} (clone with ../shared beside)"
)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CIFAR_SHAPE = (3, 32, 32)


def raw_batch(path: Path) -> dict[bytes, object]:
    """The reference reader: a plain (trusted) pickle.load of a shared batch file."""
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


@pytest.fixture(scope="module")
def cifar() -> DataBundle:
    return load_data(f"cifar10:{CIFAR_DIR}", MEAN, STD, CIFAR_SHAPE)


# ------------------------------------------------------------------------------------------ CIFAR-10
@needs_shared
def test_cifar_sizes_shapes_and_labels(cifar: DataBundle) -> None:
    assert (cifar.name, cifar.num_classes) == ("cifar10", 10)
    assert len(cifar.test) == 932 and len(cifar.train) == 4829  # type: ignore[arg-type]
    x, y = cifar.test[0]
    assert x.shape == CIFAR_SHAPE and x.dtype == torch.float32 and isinstance(y, int)
    test_raw = raw_batch(BATCHES / "test_batch")
    assert cifar.test.labels.tolist() == list(test_raw[b"labels"])  # type: ignore[attr-defined]
    train_labels = [lab for i in range(1, 6) for lab in raw_batch(BATCHES / f"data_batch_{i}")[b"labels"]]
    assert cifar.train.labels.tolist() == train_labels  # type: ignore[attr-defined]
    assert cifar.train[4828][1] == train_labels[-1]


@needs_shared
def test_cifar_normalization_matches_numpy(cifar: DataBundle) -> None:
    data = np.asarray(raw_batch(BATCHES / "test_batch")[b"data"]).reshape(-1, 3, 32, 32)
    ref = (data / 255.0 - np.array(MEAN)[None, :, None, None]) / np.array(STD)[None, :, None, None]
    np.testing.assert_allclose(cifar.test.images.numpy(), ref, atol=1e-5)  # type: ignore[attr-defined]
    np.testing.assert_allclose(cifar.test[5][0].numpy(), ref[5], atol=1e-5)


@needs_shared
def test_cifar_calib_indices_and_batches_folder_itself(cifar: DataBundle) -> None:
    expected = json.loads((CIFAR_DIR / "calib_train_indices_256.json").read_text())["indices"]
    assert cifar.calib_indices == expected and len(expected) == 256
    direct = load_data(f"cifar10:{BATCHES}", MEAN, STD, CIFAR_SHAPE)  # the batches folder itself
    assert len(direct.test) == 932 and direct.calib_indices == expected  # type: ignore[arg-type]


@needs_shared
def test_cifar_resized_for_larger_model_input() -> None:
    bundle = load_data(f"cifar10:{CIFAR_DIR}", MEAN, STD, (3, 48, 48))
    assert bundle.test[0][0].shape == (3, 48, 48)


def test_cifar_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(DataError, match="does-not-exist"):
        load_data(f"cifar10:{missing}", MEAN, STD, CIFAR_SHAPE)


def test_cifar_folder_without_batches(tmp_path: Path) -> None:
    (tmp_path / "something.txt").write_text("hi")
    with pytest.raises(DataError, match="cifar-10-batches-py") as info:
        load_data(f"cifar10:{tmp_path}", MEAN, STD, CIFAR_SHAPE)
    assert str(tmp_path) in str(info.value)


def write_cifar(root: Path, n: int = 6, proto: int = 2, with_calib: bool = False) -> Path:
    """A tiny synthetic CIFAR-10 folder written by this numpy (protocol ``proto``)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=proto))
    if with_calib:
        (root / "calib_train_indices_256.json").write_text(json.dumps({"indices": [3, 1, 4]}))
    return folder


@pytest.mark.parametrize("proto", [2, 4, 5])
def test_cifar_synthetic_pickles(tmp_path: Path, proto: int) -> None:
    folder = write_cifar(tmp_path, proto=proto, with_calib=True)
    bundle = load_data(f"cifar10:{tmp_path}", MEAN, STD, CIFAR_SHAPE)
    assert len(bundle.train) == 30 and len(bundle.test) == 6  # type: ignore[arg-type]
    assert bundle.calib_indices == [3, 1, 4]
    raw = pickle.loads((folder / "test_batch").read_bytes())
    want = (raw[b"data"][2].reshape(3, 32, 32) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_allclose(bundle.test[2][0].numpy(), want, atol=1e-5)


def test_cifar_bad_calib_file(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    (tmp_path / "calib_train_indices_256.json").write_text(json.dumps({"indices": [0, 999]}))
    with pytest.raises(DataError, match="indices"):
        load_data(f"cifar10:{tmp_path}", MEAN, STD, CIFAR_SHAPE)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_cifar_malicious_pickle_refused(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(marker), b"labels": [0]}
    for name in ("data_batch_1", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match="refusing to unpickle") as info:
        load_data(f"cifar10:{tmp_path / 'data'}", MEAN, STD, CIFAR_SHAPE)
    assert "system" in str(info.value)
    assert not marker.exists()


def test_cifar_wrong_content_and_truncated(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path / "a")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": [1, 2, 3], b"labels": [0]}, protocol=2))
    with pytest.raises(DataError, match="uint8 array"):
        load_data(f"cifar10:{tmp_path / 'a'}", MEAN, STD, CIFAR_SHAPE)
    folder = write_cifar(tmp_path / "b")
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:1000])
    with pytest.raises(DataError, match="cannot read"):
        load_data(f"cifar10:{tmp_path / 'b'}", MEAN, STD, CIFAR_SHAPE)
    folder = write_cifar(tmp_path / "c")
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        load_data(f"cifar10:{tmp_path / 'c'}", MEAN, STD, CIFAR_SHAPE)


# ---------------------------------------------------------------------------------------- augment
def test_augment_batch_is_padded_crop_or_flip() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = augment_batch(x, pad=2, flip=True, fill=fill, generator=g)
    assert out.shape == x.shape
    padded = fill.view(1, 3, 1, 1).repeat(16, 1, 12, 12)
    padded[:, :, 2:10, 2:10] = x
    for i in range(16):
        windows = [
            win
            for oy in range(5)
            for ox in range(5)
            for win in (padded[i, :, oy : oy + 8, ox : ox + 8], padded[i, :, oy : oy + 8, ox : ox + 8].flip(2))
        ]
        assert any(torch.equal(out[i], w) for w in windows), i
    assert torch.equal(augment_batch(x, pad=0, flip=False), x)


def test_augmented_train_split(tmp_path: Path) -> None:
    write_cifar(tmp_path, n=20)
    plain = load_data(f"cifar10:{tmp_path}", MEAN, STD, CIFAR_SHAPE)
    aug = load_data(f"cifar10:{tmp_path}", MEAN, STD, CIFAR_SHAPE, augment=True)
    torch.manual_seed(0)
    batch = torch.stack([aug.train[i][0] for i in range(len(aug.train))])  # type: ignore[arg-type]
    assert batch.shape == (100, *CIFAR_SHAPE)
    assert not torch.equal(batch, plain.train.images)  # type: ignore[attr-defined]
    assert torch.equal(aug.test[0][0], plain.test[0][0])  # the test split is never augmented
    xb, yb = next(iter(make_loader(aug.train, 32)))  # batched fetch: one vectorized augmentation per batch
    assert xb.shape == (32, *CIFAR_SHAPE) and torch.equal(yb, plain.train.labels[:32])  # type: ignore[attr-defined]
    assert not torch.equal(xb, plain.train.images[:32])  # type: ignore[attr-defined]
    calib = calibration_subset(aug, 10)
    ref = calibration_subset(plain, 10)
    assert torch.equal(calib.images, ref.images)  # type: ignore[attr-defined]
    assert all(torch.equal(calib[i][0], ref[i][0]) for i in range(10))  # calibration is never augmented


# ------------------------------------------------------------------------------------- imagefolder
def write_tree(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), per_class: int = 2) -> None:
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(per_class):
            color = (40 * ci + 10 * j, 100, 200)
            Image.new("RGB", (40, 30), color).save(root / cls / f"{j}.png")


def test_imagefolder_small_model(tmp_path: Path) -> None:
    write_tree(tmp_path)
    bundle = load_data(f"imagefolder:{tmp_path}", MEAN, STD, CIFAR_SHAPE)
    assert (bundle.name, bundle.num_classes, len(bundle.test)) == ("imagefolder", 3, 6)  # type: ignore[arg-type]
    x, y = bundle.test[2]
    assert x.shape == CIFAR_SHAPE and y == 1
    want = (torch.tensor([40.0, 100.0, 200.0]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(x[:, 16, 16], want, atol=1e-5, rtol=0)


def test_imagefolder_imagenet_eval_and_split(tmp_path: Path) -> None:
    write_tree(tmp_path / "train", per_class=3)
    write_tree(tmp_path / "val", per_class=1)
    bundle = load_data(f"imagefolder:{tmp_path}", MEAN, STD, (3, 224, 224))
    assert len(bundle.train) == 9 and len(bundle.test) == 3 and bundle.num_classes == 3  # type: ignore[arg-type]
    assert bundle.test[0][0].shape == (3, 224, 224)
    assert calibration_subset(bundle, 4)[0][0].shape == (3, 224, 224)


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="class"):
        load_data(f"imagefolder:{tmp_path / 'empty'}", MEAN, STD, CIFAR_SHAPE)
    with pytest.raises(DataError, match="needs a path"):
        load_data("imagefolder", MEAN, STD, CIFAR_SHAPE)


def corrupt_tree(root: Path) -> Path:
    """A 3-class tree with one corrupt JPEG (truncated garbage after a JPEG header)."""
    write_tree(root)
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 10)
    return bad


@pytest.mark.fault(input="--data imagefolder:PATH with one corrupt JPEG", exit_code=2, kept="nothing run",
                   message="cannot read image PATH/dog/broken.jpg (UnidentifiedImageError: ...); replace or remove "
                           "it, or skip unreadable images with imagefolder:PATH?skip_unreadable")
def test_a_corrupt_image_is_one_line_naming_the_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from quantbench.cli.main import app

    bad = corrupt_tree(tmp_path)
    bundle = load_data(f"imagefolder:{tmp_path}", MEAN, STD, CIFAR_SHAPE)
    with pytest.raises(DataError, match=rf"cannot read image {bad}.*skip_unreadable"):
        [bundle.test[i] for i in range(len(bundle.test))]  # type: ignore[arg-type]
    res = CliRunner().invoke(app, ["ptq", "--model", "resnet20_cifar", "--data", f"imagefolder:{tmp_path}",
                                   "--calib-size", "4", "--w-observer", "minmax", "--a-observer", "minmax"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "broken.jpg" in " ".join(res.output.split()), res.output
    assert len(res.output.strip().splitlines()) <= 3, res.output  # one message (rich wraps a long path)


@pytest.mark.fault(input="--data imagefolder:PATH?skip_unreadable with one corrupt JPEG", exit_code=0,
                   message="DataWarning: skipped 1 unreadable image(s) of 7 in PATH (first: PATH/dog/broken.jpg)",
                   kept="the readable images, all used")
def test_skip_unreadable_leaves_out_and_counts_the_corrupt_images(tmp_path: Path) -> None:
    bad = corrupt_tree(tmp_path)
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable image\(s\) of 7 in {tmp_path} \(first: {bad}\)"):
        bundle = load_data(f"imagefolder:{tmp_path}?skip_unreadable", MEAN, STD, CIFAR_SHAPE)
    assert len(bundle.test) == 6 and bundle.num_classes == 3  # type: ignore[arg-type]
    assert all(bundle.test[i][0].shape == CIFAR_SHAPE for i in range(6))
    with pytest.raises(DataError, match="has no option 'skip_unreadabel'; its options: skip_unreadable"):
        load_data(f"imagefolder:{tmp_path}?skip_unreadabel", MEAN, STD, CIFAR_SHAPE)
    with pytest.raises(DataError, match="'digits' has no option"):
        load_data("digits?skip_unreadable", DIGITS_MEAN, DIGITS_STD, (1, 8, 8))


# ------------------------------------------------------------------------------------------ digits
DIGITS_MEAN, DIGITS_STD = (0.30526028624095713,), (0.3760492217920148,)


def test_digits_split_and_determinism() -> None:
    a = load_data("digits", DIGITS_MEAN, DIGITS_STD, (1, 8, 8))
    b = load_data("digits", DIGITS_MEAN, DIGITS_STD, (1, 8, 8))
    assert (a.name, a.num_classes, a.calib_indices) == ("digits", 10, None)
    assert len(a.train) == 1437 and len(a.test) == 360  # type: ignore[arg-type]
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)  # type: ignore[attr-defined]
    counts = torch.bincount(a.test.labels, minlength=10)  # type: ignore[attr-defined]
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified
    x, y = a.test[0]
    assert x.shape == (1, 8, 8) and isinstance(y, int)
    pixels = torch.cat([a.train.images, a.test.images]) * DIGITS_STD[0] + DIGITS_MEAN[0]  # type: ignore[attr-defined]
    assert float(pixels.mean()) == pytest.approx(DIGITS_MEAN[0], abs=1e-5)
    grid = pixels * 16
    torch.testing.assert_close(grid, grid.round(), atol=1e-4, rtol=0)  # raw 0..16 integers, scaled by 1/16


def test_channel_mismatch() -> None:
    with pytest.raises(DataError, match=r"1-channel.*3 channels"):
        load_data("digits", MEAN, STD, CIFAR_SHAPE)
    with pytest.raises(DataError, match="3-channel"):
        load_data("cifar10:/nowhere", DIGITS_MEAN, DIGITS_STD, (1, 8, 8))


def test_bad_specs() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_data("mnist:/x", MEAN, STD, CIFAR_SHAPE)
    assert all(k in str(info.value) for k in ("cifar10", "digits", "imagefolder"))
    assert {"cifar10", "digits", "imagefolder"} <= set(DATASETS.names())
    with pytest.raises(DataError, match="takes no path"):
        load_data("digits:/x", DIGITS_MEAN, DIGITS_STD, (1, 8, 8))
    with pytest.raises(ConfigError):
        load_data("", MEAN, STD, CIFAR_SHAPE)
    with pytest.raises(ConfigError, match="mean/std"):
        load_data("digits", (0.5, 0.5), (0.2, 0.2), (1, 8, 8))


# ------------------------------------------------------------------------------ calibration/loader
@needs_shared
def test_calibration_subset_from_shared_indices(cifar: DataBundle) -> None:
    assert cifar.calib_indices is not None
    sub = calibration_subset(cifar, 16)
    assert len(sub) == 16  # type: ignore[arg-type]
    for j, i in enumerate(cifar.calib_indices[:16]):
        assert torch.equal(sub[j][0], cifar.train[i][0]) and sub[j][1] == cifar.train[i][1]
    no_json = DataBundle(cifar.name, cifar.train, cifar.test, 10, None)
    # the seeded fallback reproduces how the shared list was drawn (default_rng(0).choice, sorted)
    fallback = calibration_subset(no_json, 256, seed=0)
    assert torch.equal(fallback.images, calibration_subset(cifar, 256).images)  # type: ignore[attr-defined]


def test_calibration_subset_random_fallback_and_errors() -> None:
    bundle = load_data("digits", DIGITS_MEAN, DIGITS_STD, (1, 8, 8))
    a, b = calibration_subset(bundle, 100, seed=1), calibration_subset(bundle, 100, seed=1)
    c = calibration_subset(bundle, 100, seed=2)
    assert len(a) == 100  # type: ignore[arg-type]
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)  # type: ignore[attr-defined]
    assert len(calibration_subset(bundle, 1437)) == 1437  # type: ignore[arg-type]
    with pytest.raises(DataError, match="at least 1"):
        calibration_subset(bundle, 0)
    with pytest.raises(EmptyCalibrationError):
        calibration_subset(bundle, 0)
    with pytest.raises(CalibrationSizeError, match=r"1438.*1437"):
        calibration_subset(bundle, 1438)


def test_make_loader() -> None:
    bundle = load_data("digits", DIGITS_MEAN, DIGITS_STD, (1, 8, 8))
    batches = list(make_loader(bundle.test, batch_size=128))
    assert [len(y) for _, y in batches] == [128, 128, 104]
    assert batches[0][0].shape == (128, 1, 8, 8) and batches[0][1].dtype == torch.int64
    first = [next(iter(make_loader(bundle.train, 32, shuffle=True, seed=s)))[1] for s in (3, 3, 4)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
    with pytest.raises(ConfigError, match="batch_size"):
        make_loader(bundle.test, 0)


def test_tensor_dataset_indexing() -> None:
    ds = TensorImageDataset(torch.arange(8.0).view(2, 1, 2, 2), torch.tensor([3, 4]))
    assert ds[-1][1] == 4 and torch.equal(ds[0][0], torch.arange(4.0).view(1, 2, 2))
    with pytest.raises(IndexError):
        ds[2]
    with pytest.raises(DataError):
        TensorImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(3))
