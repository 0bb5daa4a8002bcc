"""Datasets by spec, held in memory as pixel-space tensors in [0, 1], with their normalisation.

Specs: `digits` (scikit-learn's bundled 8x8 digits, upsampled to 3x32x32: the embedded default that needs
no download). Further specs (`cifar10[:ROOT]`, `cifar100[:ROOT]`, `gtsrb[:ROOT]`, `imagefolder:PATH`)
register through `register_dataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rkdtool.errors import UsageError

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
