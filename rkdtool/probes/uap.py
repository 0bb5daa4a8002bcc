"""Untargeted universal perturbations synthesised from the teacher alone: the defender's trigger stand-ins.

ABD's Self-Retrospection synthesises a universal perturbation from the (possibly backdoored) model
(algorithms.md §4.2); defence.md §2a found that an *untargeted* one, maximising KL(p(x) || p(x + delta))
over clean images, lands on the backdoor's target class (and scatters on a clean teacher), so its dominant
class names the suspected target. Three parametrisations: grey L-inf (`linf1`), per-channel L-inf
(`linf3`) and a learnable blend (`blend1`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.data import ImageData, augment, normalize
from rkdtool.training import ProgressFn, batches, frozen, no_progress, steps_per_epoch

KINDS = ("linf1", "linf3", "blend1")


@dataclass
class Perturbation:
    """A universal perturbation applied to pixel-space batches in [0, 1]."""

    kind: str
    budget: float
    tensor: torch.Tensor  # delta (linf) or the blend pattern (blend1), (C, H, W)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        t = self.tensor.to(images.device, images.dtype)
        if self.kind == "blend1":
            return (1 - self.budget) * images + self.budget * t
        return (images + t).clamp(0, 1)


@dataclass
class RandomNoise:
    """The control stand-in: fresh grey uniform noise in [-budget, budget] per image at every call (torch's
    global RNG, seeded by `seed_everything`). Invariance to it is what consistency training gives without
    synthesis (defence.md §3: it left 35% ASR where synthesised perturbations left 0.6-2.2%)."""

    budget: float
    kind: str = "noise"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        noise = (torch.rand(n, 1, h, w) * 2 - 1).to(images.device, images.dtype) * self.budget
        return (images + noise).clamp(0, 1)


def _parametrise(kind: str, budget: float, raw: torch.Tensor) -> torch.Tensor:
    if kind == "blend1":
        return torch.sigmoid(raw)
    return raw.clamp(-budget, budget)


def synthesise_uap(
    teacher: nn.Module,
    data: ImageData,
    *,
    kind: str = "linf1",
    budget: float = 0.2,
    epochs: int = 3,
    max_steps: int | None = None,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
) -> Perturbation:
    """Gives back a universal perturbation maximising KL(p(x) || p(x')) of the frozen model (clean data).

    `teacher` is any classifier on normalised input: the teacher, or the student as it trains (refresh).
    `max_steps` stops early (refreshes use a few dozen steps, not whole epochs).
    """
    if kind not in KINDS:
        raise ValueError(f"perturbation kind must be one of {', '.join(KINDS)}, got {kind!r}")
    teacher.eval()
    h, w = data.train_images.shape[-2:]
    channels = 3 if kind == "linf3" else 1
    if kind == "blend1":
        raw = torch.randn(channels, h, w, generator=generator)
        lr = 0.1
    else:
        raw = (torch.rand(channels, h, w, generator=generator) * 2 - 1) * budget
        lr = 0.01
    raw = raw.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=lr)
    total = epochs * steps_per_epoch(len(data.train_labels), 64)
    if max_steps is not None:
        total = min(total, max_steps)
    with frozen(teacher):  # the perturbation learns; the model's own flags come back after
        done = 0
        for _ in range(epochs):
            for images, _labels in batches(data.train_images, data.train_labels, 64, generator):
                if done >= total:
                    break
                x = augment(images, data.augmentation, generator).to(device)
                with torch.no_grad():
                    clean_logp = nn.functional.log_softmax(teacher(normalize(x, data.mean, data.std)), 1)
                pert = Perturbation(kind, budget, _parametrise(kind, budget, raw).expand(3, h, w))
                moved = teacher(normalize(pert.apply(x), data.mean, data.std))
                moved_logp = nn.functional.log_softmax(moved, 1)
                kl = nn.functional.kl_div(moved_logp, clean_logp, log_target=True, reduction="batchmean")
                optimizer.zero_grad(set_to_none=True)
                (-kl).backward()
                optimizer.step()
                if kind != "blend1":
                    with torch.no_grad():
                        raw.clamp_(-budget, budget)
                done += 1
                progress(f"trigger synthesis ({kind})", done, total)
    final = _parametrise(kind, budget, raw.detach()).expand(3, h, w).cpu().clone()
    return Perturbation(kind, budget, final)


@dataclass
class SinkReport:
    """Where a perturbation sends clean test images: the dominant class and its share."""

    kind: str
    dominant_class: int
    share: float  # share of test images (not already of that class) sent to the dominant class


@torch.no_grad()
def perturbation_sink(
    model: nn.Module, data: ImageData, perturbation: Perturbation, device: torch.device
) -> SinkReport:
    """Gives back the class a perturbation sends most test images to, and the share it sends there."""
    model.eval()
    x = perturbation.apply(data.test_images.to(device))
    preds = model(normalize(x, data.mean, data.std)).argmax(1).cpu()
    dominant = int(torch.bincount(preds, minlength=data.num_classes).argmax())
    others = data.test_labels != dominant
    share = float((preds[others] == dominant).float().mean()) if others.any() else 0.0
    return SinkReport(perturbation.kind, dominant, share)


def apply_pool(
    pool: Sequence[Perturbation], images: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Gives back images each carrying one perturbation drawn uniformly from the pool."""
    choice = torch.randint(0, len(pool), (len(images),), generator=generator).to(images.device)
    out = images.clone()
    for i, pert in enumerate(pool):
        chosen = choice == i
        if chosen.any():
            out[chosen] = pert.apply(images[chosen])
    return out
