"""ACC and ASR on pixel-space image tensors, batched, with normalisation applied inside.

ASR (DESIGN §5, the ABD definition): the share of test images whose true label is not the target that
the model sends to the target once triggered. The RobustKD code's variant counts every image, target
class included (algorithms.md §2.1); it is reported beside, labelled `asr_all_images`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.data import normalize
from rkdtool.models import placement
from rkdtool.probes.spec import Probe

ASR_DEFINITION = (
    "share of non-target-class test images that the model classifies as the target once the trigger is "
    "applied; asr_all_images counts every test image (the RobustKD code's variant); a probe without a "
    "target reports the flip rate to the most frequent predicted class"
)


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, *, mean, std, batch_size: int = 512, probe: Probe | None = None
) -> torch.Tensor:
    """Gives back the logits of `model` (eval mode) on pixel-space images, optionally triggered."""
    was_training = model.training
    model.eval()
    param_device, param_dtype = placement(model)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(param_device, param_dtype)
        x = normalize(batch, mean, std) if probe is None else probe.model_input(batch, mean=mean, std=std)
        outputs.append(model(x).float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, mean, std, batch_size=512
) -> float:
    """Gives back top-1 accuracy on clean pixel-space images, in [0, 1]."""
    preds = predict_logits(model, images, mean=mean, std=std, batch_size=batch_size).argmax(1)
    return float((preds == labels.cpu()).float().mean())


@dataclass(frozen=True)
class AsrResult:
    asr: float  # non-target images (DESIGN §5)
    asr_all_images: float  # every image, as the RobustKD code counts
    target: int  # the probe's target, or the most frequent predicted class for untargeted probes
    targeted: bool = True  # False: `asr` is the flip rate to `target`, the most frequent predicted class

    def to_json(self) -> dict:
        return {
            "asr": self.asr,
            "asr_all_images": self.asr_all_images,
            "target": self.target,
            "targeted": self.targeted,
        }


def asr_from_predictions(preds: torch.Tensor, labels: torch.Tensor, target: int | None) -> AsrResult:
    """Gives back ASR from predictions on triggered images; `target=None` uses the most frequent class."""
    preds, labels = preds.cpu(), labels.cpu()
    targeted = target is not None
    if target is None:
        target = int(torch.bincount(preds).argmax()) if len(preds) else 0
    hit = preds == target
    non_target = labels != target
    asr = float(hit[non_target].float().mean()) if non_target.any() else 0.0
    return AsrResult(asr, float(hit.float().mean()) if len(hit) else 0.0, int(target), targeted)


def probe_results(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    probes: Sequence[Probe],
    *,
    mean,
    std,
    batch_size: int = 512,
) -> dict[str, AsrResult]:
    """Gives back the ASR of every probe on `images`, keyed by probe name."""
    return {
        p.name: asr_from_predictions(
            predict_logits(model, images, mean=mean, std=std, batch_size=batch_size, probe=p).argmax(1),
            labels,
            p.target,
        )
        for p in probes
    }


def attack_success_rate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, probe: Probe, *, mean, std, batch_size=512
) -> float:
    """Gives back the ASR of one probe (DESIGN §5 definition), in [0, 1]."""
    return probe_results(model, images, labels, [probe], mean=mean, std=std, batch_size=batch_size)[
        probe.name
    ].asr
