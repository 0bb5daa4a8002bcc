"""Feature-variance diagnostics of the main job's report (the RobustKD paper's Fig. 2 and Finding 2): the
teacher, its clean control, the detoxified teacher and the teacher under the synthesised stand-ins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rkdtool.data import ImageData, normalize
from rkdtool.distill.robustkd import DetoxMasks
from rkdtool.probes.features import variance_profiles


@dataclass
class StandInProbe:
    """A synthesised perturbation seen as an untargeted probe, for feature-variance diagnostics."""

    name: str
    perturbation: object
    target: int | None = None

    def model_input(self, images: torch.Tensor, *, mean, std) -> torch.Tensor:
        return normalize(self.perturbation.apply(images), mean, std)


def teacher_variance(
    model, arch: str, data: ImageData, probes: list, stand_ins: list = (), masks: DetoxMasks | None = None
) -> dict:
    """Gives back the per-stage feature variance of `model` (through `masks` when given) on clean test
    images, under each probe (targeted probes: non-target images only) and under each synthesised stand-in
    (paper Fig. 2, Finding 2)."""
    named = list(probes) + [StandInProbe(f"synthesised-{p.kind}", p) for p in stand_ins]
    rewrite = masks.rewrite if masks is not None else None
    return variance_profiles(
        model, arch, data.test_images, data.test_labels, named, mean=data.mean, std=data.std, rewrite=rewrite
    )
