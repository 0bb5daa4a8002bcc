"""Feature variance per stage on clean and triggered inputs (RobustKD paper, Fig. 2 and "Finding 2").

The paper's Finding 2: a backdoored teacher's features vary more on triggered inputs. For every tap of
the architecture (the end of each stage, `parse_arch(arch).taps`), the per-sample population variance
over all C*H*W elements of the raw stage output F_k (the residual stream, pre-BN) and of the distilled
pre-ReLU tensor, averaged over images (feasibility.md §3 measures the same quantity). Clean and
triggered statistics use the same images: those whose label is not the probe's target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.data import normalize
from rkdtool.models import FeatureTaps, TapPoint, parse_arch, placement
from rkdtool.probes.spec import Probe


@dataclass(frozen=True)
class VarianceStat:
    mean: float
    std: float

    def to_json(self) -> dict:
        return {"mean": self.mean, "std": self.std}


@dataclass(frozen=True)
class StageVariance:
    """One stage: variance of its output on clean and (when a probe is given) triggered images."""

    stage: str  # the stream module, e.g. block3
    clean: VarianceStat  # raw stage output F_k
    clean_distilled: VarianceStat  # the distilled pre-ReLU tensor BN(F_k)
    triggered: VarianceStat | None = None
    triggered_distilled: VarianceStat | None = None

    @property
    def ratio(self) -> float | None:
        """Triggered over clean variance of the raw stage output, on the same images."""
        return None if self.triggered is None else self.triggered.mean / max(self.clean.mean, 1e-12)

    def to_json(self) -> dict:
        out = {
            "stage": self.stage,
            "clean": self.clean.to_json(),
            "clean_distilled": self.clean_distilled.to_json(),
        }
        if self.triggered is not None and self.triggered_distilled is not None:
            out["triggered"] = self.triggered.to_json()
            out["triggered_distilled"] = self.triggered_distilled.to_json()
            out["ratio"] = self.ratio
        return out


@dataclass(frozen=True)
class VarianceProfile:
    """Feature variance per stage of one model, optionally under one probe."""

    probe: str | None
    images: int
    stages: tuple[StageVariance, ...]

    def to_json(self) -> dict:
        return {"probe": self.probe, "images": self.images, "stages": [s.to_json() for s in self.stages]}

    def compare(self, reference: VarianceProfile) -> list[dict]:
        """Gives back, per stage, how far this model's variance exceeds a reference model's (a clean one).

        `triggered_ratio` is this model's triggered variance over the reference's on the same triggered
        images; `triggered_excess` the difference; likewise for clean inputs.
        """
        rows = []
        for mine, ref in zip(self.stages, reference.stages, strict=True):
            row = {
                "stage": mine.stage,
                "clean_ratio": mine.clean.mean / max(ref.clean.mean, 1e-12),
                "clean_excess": mine.clean.mean - ref.clean.mean,
            }
            if mine.triggered is not None and ref.triggered is not None:
                row["triggered_ratio"] = mine.triggered.mean / max(ref.triggered.mean, 1e-12)
                row["triggered_excess"] = mine.triggered.mean - ref.triggered.mean
            rows.append(row)
        return rows


def _stat(values: torch.Tensor) -> VarianceStat:
    return VarianceStat(float(values.mean()), float(values.std()) if len(values) > 1 else 0.0)


@torch.inference_mode()
def _per_sample_variance(
    model: nn.Module, taps: Sequence[TapPoint], batches: list[torch.Tensor], rewrite=None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    raw: list[list[torch.Tensor]] = [[] for _ in taps]
    distilled: list[list[torch.Tensor]] = [[] for _ in taps]
    with FeatureTaps(model, taps, rewrite=rewrite) as hooks:
        for x in batches:
            hooks.run(x)
            for k in range(len(taps)):
                raw[k].append(hooks.stages[k].flatten(1).float().var(1, unbiased=False).cpu())
                distilled[k].append(hooks.features[k].flatten(1).float().var(1, unbiased=False).cpu())
    return [torch.cat(v) for v in raw], [torch.cat(v) for v in distilled]


def feature_variance(
    model: nn.Module,
    taps: str | Sequence[TapPoint],
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    probe: Probe | None = None,
    *,
    mean,
    std,
    batch_size: int = 256,
    rewrite=None,
) -> VarianceProfile:
    """Gives back the per-stage feature variance of `model` on clean and, with a probe, triggered images.

    `taps` is an architecture name (its registry taps) or a list of TapPoints. With a targeted probe and
    labels, only images whose label is not the target are used, for clean and triggered alike. `rewrite`
    (detox masks' `rewrite`) measures the detoxified teacher: its stage outputs after the masks.
    """
    points = parse_arch(taps).taps if isinstance(taps, str) else tuple(taps)
    if probe is not None and probe.target is not None and labels is not None:
        images = images[labels.cpu() != probe.target]
    was_training = model.training
    model.eval()
    param_device, param_dtype = placement(model)
    chunks = [
        images[i : i + batch_size].to(param_device, param_dtype) for i in range(0, len(images), batch_size)
    ]
    try:
        clean_raw, clean_dist = _per_sample_variance(
            model, points, [normalize(x, mean, std) for x in chunks], rewrite
        )
        trig_raw = trig_dist = None
        if probe is not None:
            trig_raw, trig_dist = _per_sample_variance(
                model, points, [probe.model_input(x, mean=mean, std=std) for x in chunks], rewrite
            )
    finally:
        model.train(was_training)
    stages = tuple(
        StageVariance(
            point.stream,
            _stat(clean_raw[k]),
            _stat(clean_dist[k]),
            None if trig_raw is None else _stat(trig_raw[k]),
            None if trig_dist is None else _stat(trig_dist[k]),
        )
        for k, point in enumerate(points)
    )
    return VarianceProfile(probe.name if probe is not None else None, len(images), stages)


def variance_profiles(
    model: nn.Module,
    taps: str | Sequence[TapPoint],
    images: torch.Tensor,
    labels: torch.Tensor,
    probes: Sequence[Probe],
    *,
    mean,
    std,
    rewrite=None,
) -> dict:
    """Gives back the JSON feature-variance profile: clean inputs, then each probe's triggered inputs."""
    kw = {"mean": mean, "std": std, "rewrite": rewrite}
    out = {"clean": feature_variance(model, taps, images, labels, **kw).to_json()}
    out["probes"] = {p.name: feature_variance(model, taps, images, labels, p, **kw).to_json() for p in probes}
    return out
