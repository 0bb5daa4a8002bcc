"""Datasets by spec, held in memory as pixel-space tensors in [0, 1], with their normalisation.

Specs: `digits` (scikit-learn's bundled 8x8 digits, upsampled to 3x32x32: the embedded default that needs
no download). Further specs (`cifar10[:ROOT]`, `cifar100[:ROOT]`, `gtsrb[:ROOT]`, `imagefolder:PATH`)
register through `register_dataset`.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rkdtool.errors import DataError, UsageError

Stats = tuple[float, float, float]


@dataclass
class ImageData:
    """A labelled image set split into train and test; images are float32 (N, 3, H, W) in [0, 1]."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    mean: Stats
    std: Stats
    num_classes: int
    augmentation: str = "translate"  # "translate" (digits) or "cifar" (reflect-pad 4, crop, flip)
    class_names: list[str] = field(default_factory=list)

    def subset(self, *, train: int | None = None, test: int | None = None, seed: int = 0) -> ImageData:
        """Gives back a copy limited to a seeded random subset of at most `train`/`test` images."""
        g = torch.Generator().manual_seed(seed)

        def pick(images: torch.Tensor, labels: torch.Tensor, n: int | None):
            if n is None or n >= len(labels):
                return images, labels
            idx = torch.randperm(len(labels), generator=g)[:n]
            return images[idx], labels[idx]

        tr = pick(self.train_images, self.train_labels, train)
        te = pick(self.test_images, self.test_labels, test)
        return ImageData(
            self.name, *tr, *te, self.mean, self.std, self.num_classes, self.augmentation, self.class_names
        )

    def split_holdout(self, share: float, *, seed: int = 0) -> tuple[ImageData, ImageData]:
        """Gives back (fit, held): the training split divided at random, `share` of it held out (at least
        one image each); both keep the test split. Choices made on `held` never touch the test images."""
        n = len(self.train_labels)
        k = min(n - 1, max(1, round(share * n)))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        parts = []
        for chosen in (idx[k:], idx[:k]):
            parts.append(
                ImageData(
                    self.name,
                    self.train_images[chosen],
                    self.train_labels[chosen],
                    self.test_images,
                    self.test_labels,
                    self.mean,
                    self.std,
                    self.num_classes,
                    self.augmentation,
                    self.class_names,
                )
            )
        return parts[0], parts[1]


DatasetLoader = Callable[[str | None, bool], ImageData]
_LOADERS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: registers `loader(arg, download)` for specs `name` and `name:ARG`."""

    def wrap(loader: DatasetLoader) -> DatasetLoader:
        _LOADERS[name] = loader
        return loader

    return wrap


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(spec: str, *, download: bool = False) -> ImageData:
    """Gives back the dataset a spec names (`digits`, `cifar100:ROOT`, ...)."""
    name, _, arg = spec.partition(":")
    loader = _LOADERS.get(name.strip().lower())
    if loader is None:
        raise UsageError(f"unknown dataset {spec!r}; known: {', '.join(dataset_names())}")
    return loader(arg or None, download)


# Scalar statistics of the digits train split (feasibility.md §1), repeated over the three channels.
DIGITS_MEAN: Stats = (0.3054, 0.3054, 0.3054)
DIGITS_STD: Stats = (0.3237, 0.3237, 0.3237)


@register_dataset("digits")
def load_digits(arg: str | None = None, download: bool = False) -> ImageData:
    """scikit-learn's 1,797 bundled digits, /16 to [0,1], bilinear 8->32, 3 channels, stratified 80/20."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if arg:
        raise UsageError("the digits dataset takes no argument (it ships inside scikit-learn)")
    bunch = sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).repeat(1, 3, 1, 1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=0.2, random_state=0, stratify=bunch.target
    )
    return ImageData(
        "digits",
        images[idx_train],
        labels[idx_train],
        images[idx_test],
        labels[idx_test],
        DIGITS_MEAN,
        DIGITS_STD,
        10,
        "translate",
        [str(i) for i in range(10)],
    )


def normalize(images: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """Gives back (images - mean) / std per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def denormalize(images: torch.Tensor, mean: Stats, std: Stats) -> torch.Tensor:
    """Gives back images * std + mean per channel (normalised -> pixel space)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m


def augment(images: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gives back a randomly augmented copy of a pixel-space batch, on whole tensors.

    translate: shift by up to +-2 px with black fill (digits). cifar: reflect-pad 4, random 32 crop,
    random horizontal flip (the FKD/RobustKD CIFAR recipe).
    """
    if kind == "none":
        return images
    b, _, h, w = images.shape
    pad, mode = (2, "constant") if kind == "translate" else (4, "reflect")
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode=mode)
    dev = images.device
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    rows = (torch.arange(h, device=dev)[None, :] + dy[:, None])[:, None, :, None]
    cols = torch.arange(w, device=dev)[None, :] + dx[:, None]
    if kind == "cifar":
        flip = torch.rand(b, generator=generator).to(dev) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def salt_and_pepper(images: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gives back images with a share p of pixels set to white (p/2) or black (p/2), shared over channels.

    The intent of RobustKD's `distiller.py::torch_add_salt` (algorithms.md §2.1), on [0,1] images before
    normalisation.
    """
    if p <= 0:
        return images
    b, _, h, w = images.shape
    draw = torch.rand(b, 1, h, w, generator=generator).to(images.device)
    out = torch.where(draw < p / 2, torch.ones_like(images), images)
    return torch.where((draw >= p / 2) & (draw < p), torch.zeros_like(images), out)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10/100, GTSRB and image folders (torchvision layouts). Each loads into memory at 32x32.

# The FKD / RobustKD CIFAR normalisation, used by all four reference repositories for CIFAR-10 and -100
# alike (algorithms.md, Conventions): (125.3, 123.0, 113.9)/255 and (63.0, 62.1, 66.7)/255.
CIFAR_MEAN: Stats = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD: Stats = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def default_data_root() -> Path:
    """Gives back where datasets live when a spec names no ROOT: $RKDTOOL_DATA, else ~/.cache/rkdtool/data."""
    if os.environ.get("RKDTOOL_DATA"):
        return Path(os.environ["RKDTOOL_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "rkdtool" / "data"


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str  # torchvision's extracted folder under ROOT
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    size_mb: int


_CIFAR = {
    "cifar10": _CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
        10,
        163,
    ),
    "cifar100": _CifarLayout(
        "CIFAR-100",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        "fine_labels",
        "fine_label_names",
        100,
        161,
    ),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches (dicts of lists, bytes and uint8 arrays) and nothing that runs code.

    torchvision reads them with plain `pickle.load`; a dataset folder from elsewhere could carry a payload.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays and lists")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"{path} is not a CIFAR python batch: {exc}") from exc
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _find_cifar_folder(layout: _CifarLayout, arg: str | None) -> Path | None:
    root = Path(arg).expanduser() if arg else default_data_root()
    for folder in (root / layout.folder, root):
        if all((folder / name).is_file() for name in (*layout.train, *layout.test, layout.meta)):
            return folder
    return None


def _load_cifar(name: str, arg: str | None, download: bool) -> ImageData:
    """CIFAR-10/100 from torchvision's extracted python batches, read without its MD5 check.

    torchvision verifies each batch's MD5 on every load, which refuses any CIFAR-format folder that is not
    the published one (a subset, a re-export, a test fixture); rkdtool reads the batches itself (with a
    restricted unpickler) and uses torchvision only to download, which does check the archive.
    """
    layout = _CIFAR[name]
    root = Path(arg).expanduser() if arg else default_data_root()
    folder = _find_cifar_folder(layout, arg)
    if folder is None and download:
        import torchvision

        dataset_class = getattr(torchvision.datasets, layout.title.replace("-", ""))
        try:
            dataset_class(str(root), train=True, download=True)
        except Exception as exc:  # network, disk, checksum: all leave the user one thing to fix
            raise DataError(f"could not download {layout.title} into {root}: {exc}") from exc
        folder = _find_cifar_folder(layout, arg)
    if folder is None:
        raise DataError(
            f"{layout.title} not found: expected {root / layout.folder} "
            f"({', '.join((*layout.train, *layout.test, layout.meta))}); pass --download to fetch it "
            f"(about {layout.size_mb} MB) or name the folder with {name}:ROOT"
        )

    def split(files: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = [_read_cifar_batch(folder / f) for f in files]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[layout.label_key], dtype=np.int64) for b in batches])
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float().div_(255.0)
        return images, torch.from_numpy(labels)

    train_images, train_labels = split(layout.train)
    test_images, test_labels = split(layout.test)
    names = [
        n.decode() if isinstance(n, bytes) else str(n)
        for n in _read_cifar_batch(folder / layout.meta)[layout.names_key]
    ]
    return ImageData(
        name,
        train_images,
        train_labels,
        test_images,
        test_labels,
        CIFAR_MEAN,
        CIFAR_STD,
        layout.num_classes,
        "cifar",
        names,
    )


@register_dataset("cifar10")
def load_cifar10(arg: str | None = None, download: bool = False) -> ImageData:
    """CIFAR-10 (50,000 train / 10,000 test, 10 classes) from ROOT/cifar-10-batches-py."""
    return _load_cifar("cifar10", arg, download)


@register_dataset("cifar100")
def load_cifar100(arg: str | None = None, download: bool = False) -> ImageData:
    """CIFAR-100 (50,000 train / 10,000 test, 100 fine classes) from ROOT/cifar-100-python."""
    return _load_cifar("cifar100", arg, download)


def _load_images(paths: list[str], size: int = 32) -> torch.Tensor:
    """Gives back RGB images resized to size x size (PIL bilinear), float32 (N, 3, size, size) in [0, 1]."""
    from PIL import Image

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            out[i] = np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def channel_stats(images: torch.Tensor) -> tuple[Stats, Stats]:
    """Gives back the per-channel mean and standard deviation of a pixel-space batch."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double()
    mean, std = flat.mean(1), flat.std(1)
    return tuple(mean.tolist()), tuple(std.tolist())  # type: ignore[return-value]


@register_dataset("gtsrb")
def load_gtsrb(arg: str | None = None, download: bool = False) -> ImageData:
    """GTSRB (39,209 train / 12,630 test, 43 classes) in torchvision's layout, resized to 32x32.

    Normalisation: the per-channel statistics of the resized training images (the reference repositories
    give none for GTSRB).
    """
    import torchvision

    root = Path(arg).expanduser() if arg else default_data_root()
    if root.name == "gtsrb" and (root / "GTSRB").is_dir():
        root = root.parent  # the spec named torchvision's inner folder
    try:
        train = torchvision.datasets.GTSRB(str(root), split="train", download=download)
        test = torchvision.datasets.GTSRB(str(root), split="test", download=download)
    except RuntimeError as exc:
        base = root / "gtsrb"
        raise DataError(
            f"GTSRB not found: expected {base / 'GTSRB' / 'Training'} and "
            f"{base / 'GTSRB' / 'Final_Test' / 'Images'} with {base / 'GT-final_test.csv'}; "
            "pass --download to fetch it (about 350 MB) or name the folder with gtsrb:ROOT"
        ) from exc
    except Exception as exc:  # download failures
        raise DataError(f"could not download GTSRB into {root}: {exc}") from exc
    # torchvision numbers the training class folders in listing order; GTSRB names them by class id
    # (00000..00042), which is the label even when some folders are absent.
    train_paths = tuple(path for path, _ in train._samples)
    train_labels = tuple(int(Path(path).parent.name) for path in train_paths)
    test_paths, test_labels = zip(*test._samples, strict=True) if test._samples else ((), ())
    if not train_paths or not test_paths:
        raise DataError(f"GTSRB under {root / 'gtsrb'} has no images in its train or test split")
    train_images = _load_images(list(train_paths))
    mean, std = channel_stats(train_images)
    return ImageData(
        "gtsrb",
        train_images,
        torch.tensor(train_labels, dtype=torch.long),
        _load_images(list(test_paths)),
        torch.tensor(test_labels, dtype=torch.long),
        mean,
        std,
        43,
        "cifar",
        [str(i) for i in range(43)],
    )


@register_dataset("imagefolder")
def load_imagefolder(arg: str | None = None, download: bool = False) -> ImageData:
    """Images in class folders, resized to 32x32: PATH/{train,test}/CLASS/* (or val/), or PATH/CLASS/*.

    Without a train/test split the images are split 80/20 per class with a fixed seed. Normalisation: the
    per-channel statistics of the training images. The augmentation is the CIFAR one (pad, crop, flip).
    """
    from torchvision.datasets import ImageFolder

    if not arg:
        raise UsageError("imagefolder needs a path: imagefolder:PATH")
    if download:
        raise UsageError("imagefolder:PATH reads a local folder; there is nothing to download")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: expected {root} holding CLASS/ or train/CLASS/ subfolders")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    try:
        if (root / "train").is_dir() and test_dir is not None:
            train_set, test_set = ImageFolder(str(root / "train")), ImageFolder(str(test_dir))
            if test_set.classes != train_set.classes:
                raise DataError(f"{root}: train/ and {test_dir.name}/ hold different class folders")
            train_samples, test_samples = train_set.samples, test_set.samples
        else:
            train_set = ImageFolder(str(root))
            g = torch.Generator().manual_seed(0)
            train_samples, test_samples = [], []
            for label in range(len(train_set.classes)):
                items = [s for s in train_set.samples if s[1] == label]
                order = torch.randperm(len(items), generator=g).tolist()
                cut = max(1, round(0.8 * len(items))) if len(items) > 1 else len(items)
                train_samples += [items[i] for i in order[:cut]]
                test_samples += [items[i] for i in order[cut:]]
    except FileNotFoundError as exc:  # ImageFolder: no class folders or no images
        raise DataError(f"{root}: {exc}") from exc
    if not test_samples:
        raise DataError(f"{root}: too few images to hold out a test split")
    train_images = _load_images([p for p, _ in train_samples])
    mean, std = channel_stats(train_images)
    return ImageData(
        f"imagefolder:{root}",
        train_images,
        torch.tensor([y for _, y in train_samples], dtype=torch.long),
        _load_images([p for p, _ in test_samples]),
        torch.tensor([y for _, y in test_samples], dtype=torch.long),
        mean,
        std,
        len(train_set.classes),
        "cifar",
        list(train_set.classes),
    )
