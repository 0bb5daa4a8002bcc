"""Datasets by spec: CIFAR-10/100 folders in torchvision's layout, GTSRB, image folders, missing data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from rkdtool.data import CIFAR_MEAN, CIFAR_STD, DataError, default_data_root, load_dataset
from rkdtool.errors import UsageError


def write_cifar(root: Path, variant: str = "cifar100", n_train: int = 24, n_test: int = 12, seed: int = 0):
    """Writes a CIFAR-format folder as torchvision extracts it (python batches), with random images.

    Gives back (train_uint8 (N, 3072), train_labels, test_uint8, test_labels). torchvision itself refuses
    such a folder: its MD5 check only accepts the published files.
    """
    rng = np.random.default_rng(seed)
    classes = 100 if variant == "cifar100" else 10
    train = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    train_labels = [int(i % classes) for i in range(n_train)]
    test_labels = [int((3 * i) % classes) for i in range(n_test)]

    def dump(path: Path, obj: dict) -> None:
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    if variant == "cifar100":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", {"data": train, "fine_labels": train_labels, "coarse_labels": train_labels})
        dump(folder / "test", {"data": test, "fine_labels": test_labels, "coarse_labels": test_labels})
        dump(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)]})
    else:  # CIFAR-10 as the original Python 2 pickles have it: bytes keys
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        parts = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(parts, start=1):
            dump(folder / f"data_batch_{i}", {b"data": train[idx], b"labels": [train_labels[j] for j in idx]})
        dump(folder / "test_batch", {b"data": test, b"labels": test_labels})
        dump(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return train, train_labels, test, test_labels


def test_cifar100_folder_loads_exactly(tmp_path):
    train, train_labels, test, test_labels = write_cifar(tmp_path, "cifar100")
    data = load_dataset(f"cifar100:{tmp_path}")
    assert data.train_images.shape == (24, 3, 32, 32) and data.test_images.shape == (12, 3, 32, 32)
    assert data.train_images.dtype == torch.float32
    expected = torch.from_numpy(train.reshape(-1, 3, 32, 32)).float() / 255
    torch.testing.assert_close(data.train_images, expected, atol=0, rtol=0)
    assert data.train_labels.tolist() == train_labels and data.test_labels.tolist() == test_labels
    assert (data.num_classes, data.augmentation, data.class_names[7]) == (100, "cifar", "class7")
    assert data.mean == CIFAR_MEAN and data.std == CIFAR_STD
    assert data.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    # The same spec naming the inner folder works too.
    assert len(load_dataset(f"cifar100:{tmp_path / 'cifar-100-python'}").train_labels) == 24


def test_torchvision_md5_check_refuses_the_folder_rkdtool_reads(tmp_path):
    write_cifar(tmp_path, "cifar100")
    with pytest.raises(RuntimeError, match="corrupted"):
        torchvision.datasets.CIFAR100(str(tmp_path), train=True, download=False)
    assert load_dataset(f"cifar100:{tmp_path}").num_classes == 100


def test_cifar10_python2_style_batches(tmp_path):
    train, train_labels, _, _ = write_cifar(tmp_path, "cifar10", n_train=15, n_test=5)
    data = load_dataset(f"cifar10:{tmp_path}")
    assert data.num_classes == 10 and data.class_names == [f"c{i}" for i in range(10)]
    assert data.train_labels.tolist() == train_labels  # batches 1..5 in order
    assert data.train_images[3, :, 0, 0].tolist() == pytest.approx((train[3, [0, 1024, 2048]] / 255).tolist())


def test_missing_cifar_names_the_folder_and_the_flag(tmp_path, monkeypatch):
    with pytest.raises(DataError) as err:
        load_dataset(f"cifar100:{tmp_path / 'nowhere'}")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message and "--download" in message
    assert "\n" not in message
    monkeypatch.setenv("RKDTOOL_DATA", str(tmp_path / "default"))
    assert default_data_root() == tmp_path / "default"
    with pytest.raises(DataError, match=str(tmp_path / "default" / "cifar-10-batches-py")):
        load_dataset("cifar10")


def test_cifar_batch_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    write_cifar(tmp_path, "cifar100")
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": Payload(), "fine_labels": []}, f)
    with pytest.raises(DataError, match="exec"):
        load_dataset(f"cifar100:{tmp_path}")
    assert not marker.exists()


def _write_png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def test_gtsrb_in_torchvision_layout(tmp_path):
    base = tmp_path / "gtsrb"
    for label, color in ((0, (255, 0, 0)), (5, (0, 0, 255))):
        for i in range(2):
            path = base / "GTSRB" / "Training" / f"{label:05d}" / f"{i:05d}_00000.ppm"
            _write_png(path, color)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, label in enumerate((5, 0, 5)):
        _write_png(
            base / "GTSRB" / "Final_Test" / "Images" / f"{i:05d}.ppm", (0, 0, 255) if label else (255, 0, 0)
        )
        rows.append(f"{i:05d}.ppm;40;30;0;0;40;30;{label}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")

    data = load_dataset(f"gtsrb:{tmp_path}")
    assert data.num_classes == 43 and data.augmentation == "cifar"
    assert data.train_images.shape == (4, 3, 32, 32) and data.test_images.shape == (3, 3, 32, 32)
    assert sorted(data.train_labels.tolist()) == [0, 0, 5, 5] and data.test_labels.tolist() == [5, 0, 5]
    # Colour survives the resize: class 5 images are blue.
    blue = data.test_images[0].mean((1, 2))
    assert blue.tolist() == pytest.approx([0.0, 0.0, 1.0])
    assert data.mean == pytest.approx((0.5, 0.0, 0.5))  # statistics of the training images


def test_missing_gtsrb_names_the_folder_and_the_flag(tmp_path):
    with pytest.raises(DataError, match=r"GTSRB not found: expected .*Training.*--download"):
        load_dataset(f"gtsrb:{tmp_path}")


def test_imagefolder_with_and_without_split(tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for name, color in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            for i in range(n):
                _write_png(tmp_path / "split" / split / name / f"{i}.png", color)
    data = load_dataset(f"imagefolder:{tmp_path / 'split'}")
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.train_images.shape == (6, 3, 32, 32) and data.test_labels.tolist() == [0, 1]

    for name, color in (("a", (0, 0, 0)), ("b", (255, 255, 255))):
        for i in range(5):
            _write_png(tmp_path / "flat" / name / f"{i}.jpg", color)
    flat = load_dataset(f"imagefolder:{tmp_path / 'flat'}")
    assert (len(flat.train_labels), len(flat.test_labels)) == (8, 2)  # 80/20 per class
    assert sorted(flat.test_labels.tolist()) == [0, 1]
    assert flat.mean == pytest.approx((0.5, 0.5, 0.5), abs=1e-6)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    with pytest.raises(UsageError, match="needs a path"):
        load_dataset("imagefolder")
