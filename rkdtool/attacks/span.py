"""The span of the clean training images, for triggers that distillation can carry.

A student distilled on clean images learns the teacher's features only along the directions those images
vary in. `digits` is grey and upsampled from 8x8, so its images fill a 64-dimensional subspace of the 3,072
pixel values; a trigger optimised freely lands mostly outside it (colour, detail finer than the 8x8 grid),
where the teacher's response is set by its own initialisation and the poisoning and the student's by its
own initialisation: whether feature distillation carries such a backdoor is then a coin toss
(benchmarks/results/attack_kit.md). A trigger kept inside the span is made of what the student has learnt to
copy. On a dataset whose images fill the whole space (CIFAR) the projection changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rkdtool.data import ImageData


@dataclass
class ImageSpan:
    """An affine subspace of pixel space: mean + span of an orthonormal `basis` (K, D)."""

    mean: torch.Tensor  # (C, H, W)
    basis: torch.Tensor  # (K, C*H*W), orthonormal rows

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """Gives back the orthogonal projection of (..., C, H, W) images onto the span (differentiable)."""
        shape = images.shape
        mean, basis = self.mean.to(images), self.basis.to(images)
        flat = (images - mean).reshape(-1, basis.shape[1])
        return (flat @ basis.T @ basis).reshape(shape) + mean

    @property
    def dimensions(self) -> int:
        return int(self.basis.shape[0])


def confine(pattern: torch.Tensor, span: ImageSpan | None) -> torch.Tensor:
    """Gives back `pattern` projected onto `span` and clamped to valid pixels [0, 1] (as it is when
    `span` is None: a free trigger); differentiable, so trigger optimisation runs through it."""
    return pattern if span is None else span.project(pattern).clamp(0, 1)


@torch.no_grad()
def image_span(data: ImageData, *, energy: float = 0.9999, max_images: int = 4096) -> ImageSpan:
    """Gives back the span of the training images: the principal directions that hold `energy` of their
    variance (all of it for digits' 64 directions, up to float error; nearly every direction for CIFAR)."""
    images = data.train_images[:max_images].double()
    mean = images.mean(0)
    flat = (images - mean).flatten(1)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    share = (s * s).cumsum(0) / (s * s).sum().clamp_min(1e-12)
    k = int((share < energy).sum()) + 1
    return ImageSpan(mean.float(), vh[:k].float().contiguous())
