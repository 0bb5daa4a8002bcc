"""RobustKD detoxification: feature masks M_l and patterns P_l fitted on clean data (Stage A).

Chen et al., "RobustKD" (paper §4.2, Eqs. 7-10, 15) as reconstructed in algorithms.md §2.4:
  Eq. 7 (chained):  F'_l = (1 - M_l) * Stage_l(F'_{l-1}) + M_l * P_l,   0 <= M_l <= tau
  Eq. 15 (ablation): F'_l = Stage_l(F'_{l-1}) + M_l * P_l
  Eqs. 8-10:        J = CE(head(F'_L), y) + lambda_var * mean_b Var(F'_{L,b})
with P_l initialised to the mean clean stage output and M_l to tau; Adam lr 1e-3; M clamped in place.

Trigger-aware fitting (defence.md §4, "TAM"; loss terms containing `inv`): the masks also see the clean
images carrying synthesised trigger stand-ins T(x), and the term mean((F'_L(T(x)) - F'_L(x))^2) / s, with s
that difference on the un-detoxified teacher, asks the detox to remove the change the stand-in makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.data import ImageData, augment, normalize
from rkdtool.models import FeatureTaps, TapPoint
from rkdtool.probes.uap import apply_pool
from rkdtool.training import ProgressFn, batches, frozen, no_progress, steps_per_epoch

DETOX_FORMS = ("eq7", "eq15")  # (1-M)F + MP (the paper) or F + MP
STAGE_SETS = {"all": None, "last": (-1,), "last2": (-2, -1)}


class DetoxMasks(nn.Module):
    """Per-stage masks M_l and patterns P_l of shape (C_l, H_l, W_l), broadcast over the batch."""

    def __init__(self, shapes: dict[int, tuple[int, ...]], tau: float, form: str = "eq7") -> None:
        super().__init__()
        if form not in DETOX_FORMS:
            raise ValueError(f"detox form must be one of {', '.join(DETOX_FORMS)}, got {form!r}")
        self.tau, self.form = float(tau), form
        self.stages = sorted(shapes)
        self.masks = nn.ParameterDict(
            {str(k): nn.Parameter(torch.full(shapes[k], float(tau))) for k in shapes}
        )
        self.patterns = nn.ParameterDict({str(k): nn.Parameter(torch.zeros(shapes[k])) for k in shapes})

    def rewrite(self, k: int, stage_output: torch.Tensor) -> torch.Tensor:
        """Gives back the detoxified stage output for tap k (unchanged for stages not detoxified)."""
        key = str(k)
        if key not in self.masks:
            return stage_output
        m, p = self.masks[key], self.patterns[key]
        if self.form == "eq7":
            return (1 - m) * stage_output + m * p
        return stage_output + m * p

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamps every M_l into [0, tau] in place (not the reference code's rebinding bug)."""
        for m in self.masks.values():
            m.clamp_(0.0, self.tau)

    def statistics(self) -> dict[str, dict[str, float]]:
        """Gives back per stage: share of M at tau, share at 0, mean M, and P's spread (std, min, max)."""
        out = {}
        for key in self.masks:
            m, p = self.masks[key].detach(), self.patterns[key].detach()
            out[f"stage{int(key) + 1}"] = {
                "mask_at_tau": float((m >= self.tau - 1e-6).float().mean()),
                "mask_at_zero": float((m <= 1e-6).float().mean()),
                "mask_mean": float(m.mean()),
                "pattern_std": float(p.std()),
                "pattern_min": float(p.min()),
                "pattern_max": float(p.max()),
            }
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Gives back {'mask.stageN', 'pattern.stageN'} for a safetensors file."""
        out = {}
        for key in self.masks:
            out[f"mask.stage{int(key) + 1}"] = self.masks[key].detach().cpu()
            out[f"pattern.stage{int(key) + 1}"] = self.patterns[key].detach().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], tau: float, form: str) -> DetoxMasks:
        shapes = {
            int(name.split("stage")[1]) - 1: tuple(t.shape)
            for name, t in tensors.items()
            if name.startswith("mask.")
        }
        masks = cls(shapes, tau, form)
        with torch.no_grad():
            for k in shapes:
                masks.masks[str(k)].copy_(tensors[f"mask.stage{k + 1}"])
                masks.patterns[str(k)].copy_(tensors[f"pattern.stage{k + 1}"])
        return masks


def select_stages(n: int, which: str) -> list[int]:
    """Gives back the tap indices a `--detox-stages` value names (all, last, last2)."""
    if which not in STAGE_SETS:
        raise ValueError(f"detox stages must be one of {', '.join(STAGE_SETS)}, got {which!r}")
    chosen = STAGE_SETS[which]
    return list(range(n)) if chosen is None else sorted(i % n for i in chosen)


@torch.no_grad()
def mean_stage_outputs(
    teacher: nn.Module,
    taps: tuple[TapPoint, ...],
    data: ImageData,
    device: torch.device,
    batch_size: int = 256,
) -> list[torch.Tensor]:
    """Gives back the mean clean stage output F_l per tap (the paper's P init, §4.2.1)."""
    teacher.eval()
    sums: list[torch.Tensor] = []
    with FeatureTaps(teacher, taps) as tapper:
        for start in range(0, len(data.train_labels), batch_size):
            tapper.run(
                normalize(data.train_images[start : start + batch_size].to(device), data.mean, data.std)
            )
            for k, stage in enumerate(tapper.stages):
                if len(sums) <= k:
                    sums.append(torch.zeros_like(stage[0]))
                sums[k] += stage.sum(0)
    return [s / len(data.train_labels) for s in sums]


@dataclass
class DetoxConfig:
    tau: float = 0.1
    form: str = "eq7"
    stages: str = "all"
    loss: str = "var+ce"  # var+ce | var | ce, or with `inv` (trigger-aware: needs a pool), e.g. inv+ce
    lambda_var: float = 1.0
    epochs: int = 40
    lr: float = 1e-3
    batch_size: int = 64


LOSS_TERMS = ("var", "ce", "inv")


def loss_terms(loss: str) -> set[str]:
    """Gives back the terms a `--detox-loss` value names (`var+ce`, `inv+ce`, ...); unknown terms raise."""
    terms = set(loss.split("+"))
    if not terms or not terms <= set(LOSS_TERMS) or "" in terms:
        raise ValueError(f"detox loss must join {', '.join(LOSS_TERMS)} with '+', got {loss!r}")
    return terms


def per_sample_variance(stage_output: torch.Tensor) -> torch.Tensor:
    """Gives back the population variance over C*H*W of each sample, averaged over the batch (Eq. 8)."""
    return stage_output.flatten(1).var(dim=1, unbiased=False).mean()


def fit_detox_masks(
    teacher: nn.Module,
    taps: tuple[TapPoint, ...],
    data: ImageData,
    config: DetoxConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    pool: Sequence = (),
) -> DetoxMasks:
    """Gives back masks fitted on `data`'s clean training images with the teacher frozen in eval mode.

    With `inv` in the loss, each step also runs the images carrying a stand-in drawn from `pool`.
    """
    terms = loss_terms(config.loss)
    if "inv" in terms and not pool:
        raise ValueError("a trigger-aware detox loss (inv) needs a pool of trigger stand-ins")
    teacher.eval()
    means = mean_stage_outputs(teacher, taps, data, device)
    stages = select_stages(len(taps), config.stages)
    masks = DetoxMasks({k: tuple(means[k].shape) for k in stages}, config.tau, config.form).to(device)
    with torch.no_grad():
        for k in stages:
            masks.patterns[str(k)].copy_(means[k])
    optimizer = torch.optim.Adam(masks.parameters(), lr=config.lr)
    last = len(taps) - 1
    scale = invariance_scale(teacher, taps, data, pool, generator, device) if "inv" in terms else 1.0
    total = config.epochs * steps_per_epoch(len(data.train_labels), config.batch_size)
    done = 0
    with frozen(teacher), FeatureTaps(teacher, taps, rewrite=masks.rewrite) as tapper:
        for _ in range(config.epochs):
            for images, labels in batches(data.train_images, data.train_labels, config.batch_size, generator):
                images = augment(images, data.augmentation, generator).to(device)
                n = len(images)
                if "inv" in terms:
                    images = torch.cat([images, apply_pool(pool, images, generator)])
                logits, _ = tapper.run(normalize(images, data.mean, data.std))
                stage = tapper.stages[last]
                loss = logits.new_zeros(())
                if "ce" in terms:
                    loss = loss + nn.functional.cross_entropy(logits[:n], labels.to(device))
                if "var" in terms:
                    loss = loss + config.lambda_var * per_sample_variance(stage[:n])
                if "inv" in terms:
                    loss = loss + (stage[n:] - stage[:n]).pow(2).mean() / scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                masks.clamp_()
                done += 1
                progress("detox masks", done, total)
    return masks.eval()


@torch.no_grad()
def invariance_scale(
    teacher: nn.Module,
    taps: tuple[TapPoint, ...],
    data: ImageData,
    pool: Sequence,
    generator: torch.Generator,
    device: torch.device,
    batch_size: int = 256,
) -> float:
    """Gives back mean((F_L(T(x)) - F_L(x))^2) of the un-detoxified teacher on the clean training images."""
    total, count = 0.0, 0
    with FeatureTaps(teacher, taps) as tapper:
        for start in range(0, len(data.train_labels), batch_size):
            x = data.train_images[start : start + batch_size].to(device)
            tapper.run(normalize(torch.cat([x, apply_pool(pool, x, generator)]), data.mean, data.std))
            stage = tapper.stages[-1]
            total += float((stage[len(x) :] - stage[: len(x)]).pow(2).sum())
            count += stage[len(x) :].numel()
    return max(total / max(count, 1), 1e-12)


class DetoxifiedTeacher(nn.Module):
    """The teacher with fixed detox masks applied: for measuring its own ACC and ASR."""

    def __init__(self, teacher: nn.Module, taps: tuple[TapPoint, ...], masks: DetoxMasks) -> None:
        super().__init__()
        self.teacher, self.taps, self.masks = teacher, taps, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with FeatureTaps(self.teacher, self.taps, rewrite=self.masks.rewrite) as tapper:
            logits, _ = tapper.run(x)
        return logits
