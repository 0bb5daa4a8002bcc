"""Shared training pieces: the FKD/RobustKD SGD recipe, seeding, devices and progress reporting."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rkdtool.data import ImageData, augment, normalize
from rkdtool.errors import UsageError

# progress(task, completed, total): the library reports, the CLI draws (Rich) or ignores it.
ProgressFn = Callable[[str, int, int], None]


def no_progress(_task: str, _done: int, _total: int) -> None:
    return None


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch; gives back a torch Generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """Gives back `cuda` when asked for or available under `auto`, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """While active, no parameter of `modules` requires a gradient (inputs still can: trigger synthesis);
    on leaving, each parameter gets back its own flag, whatever it was."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def sgd(params, lr: float, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """Gives back the FKD/RobustKD optimiser: SGD, Nesterov, momentum 0.9 (algorithms.md §1.7)."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def step_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """Gives back lr for `epoch`: x0.1 from 50% and x0.01 from 75% of the epochs (algorithms.md §1.7)."""
    if epoch >= (3 * epochs) // 4 and epochs >= 4:
        return base_lr * 0.01
    if epoch >= epochs // 2 and epochs >= 2:
        return base_lr * 0.1
    return base_lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator, *, shuffle=True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (images, labels) mini-batches in a seeded random order; the last short batch is kept."""
    order = torch.randperm(len(labels), generator=generator) if shuffle else torch.arange(len(labels))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]


def batch_steps(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    steps: int,
    progress: ProgressFn = no_progress,
    task: str = "steps",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields `steps` mini-batches of `batches`, epoch after epoch, and reports `progress` after the
    caller's step on each (the trigger optimisations' loop: a step count, not an epoch count)."""
    done = 0
    while done < steps:
        for batch in batches(images, labels, batch_size, generator):
            yield batch
            done += 1
            progress(task, done, steps)
            if done >= steps:
                return


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


@dataclass
class ClassifierRecipe:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    schedule: str = "step"  # "step" (x0.1 at 50%, x0.01 at 75%) or "constant"


BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def train_classifier(
    model: nn.Module,
    data: ImageData,
    recipe: ClassifierRecipe,
    *,
    generator: torch.Generator,
    device: torch.device,
    transform: BatchTransform | None = None,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: ProgressFn = no_progress,
    task: str = "train",
) -> nn.Module:
    """Gives back `model` trained with cross-entropy on `data` (augmented; `transform` may poison a batch).

    `transform(images, labels, generator)` sees pixel-space batches after augmentation (BadNets-style
    poisoning happens there); `extra_loss(model, normalised_images, labels)` adds attack terms.
    """
    model.to(device).train()
    optimizer = sgd(model.parameters(), recipe.lr, recipe.weight_decay)
    total = recipe.epochs * steps_per_epoch(len(data.train_labels), recipe.batch_size)
    done = 0
    for epoch in range(recipe.epochs):
        lr = step_lr(recipe.lr, epoch, recipe.epochs) if recipe.schedule == "step" else recipe.lr
        set_lr(optimizer, lr)
        for images, labels in batches(data.train_images, data.train_labels, recipe.batch_size, generator):
            images = augment(images, data.augmentation, generator)
            if transform is not None:
                images, labels = transform(images, labels, generator)
            x = normalize(images.to(device), data.mean, data.std)
            y = labels.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            if extra_loss is not None:
                loss = loss + extra_loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            progress(task, done, total)
    return model.eval()
