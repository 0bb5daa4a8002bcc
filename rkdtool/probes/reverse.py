"""Trigger reverse-engineering (Neural Cleanse) for unknown attacks, budget-aware.

Wang et al., "Neural Cleanse" (IEEE S&P 2019), Alg. 1 and §IV: for each candidate target class c,
optimise a mask m in [0,1]^(1xHxW) and a pattern p in [0,1]^(3xHxW) so that `(1 - m) x + m p` sends clean
images of other classes to c, at the smallest L1 norm |m|_1: `CE(f(x'), c) + lambda_c |m|_1`, with
lambda_c raised x1.5 while the attack succeeds and lowered /1.5^1.5 while it fails (their `cost`
schedule, `patience` steps). The anomaly index of class c is `(median - s_c) / (1.4826 * MAD)` over the
classes (positive: a smaller mask than usual); a class above 2 is flagged. Neural Cleanse takes s_c = |m_c|;
rkdtool takes s_c = log |m_c| by default (`scale="log"`) and reports the linear index beside it. Mask norms
are positive and spread multiplicatively: on digits the clean classes' smallest masks span 30-160, so the
linear MAD is dominated by that spread and a BadNets target whose mask is 12x smaller than the median
scores 1.5-1.6 (not flagged); on the log scale it scores 3.5-3.9 on one CPU and 10.6-14.7 on another, where a
clean teacher's largest class reached 0.86-2.01: the threshold (`ReverseConfig.threshold`, Neural Cleanse's
2) is a screen that can flag a clean class (benchmarks/results/attack_kit.md). The flagged classes'
triggers become pixel-space `image-mask` probes that later stages load.

Every candidate class is optimised at once: the batch holds one triggered copy of each image per class
(one forward of K*B images), and Adam's per-element updates keep the classes independent.

Budget: `classes=N` (fewer than the model's classes) first screens every class with a short run
(`screen_steps`), then runs the full optimisation on the N classes with the smallest screened masks (a
backdoor target needs the smallest one). The anomaly index then comes from the screened norms of all
classes, one statistic on one scale; the refined runs give the triggers. `estimate_seconds` times a few
steps and says what a configuration costs before it runs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from rkdtool.data import normalize
from rkdtool.errors import UsageError
from rkdtool.models import placement
from rkdtool.probes.spec import Probe
from rkdtool.training import ProgressFn, frozen, no_progress

MAD_CONSISTENCY = 1.4826  # MAD -> standard deviation under normality (Neural Cleanse §IV-C)


@dataclass
class ReverseConfig:
    """Neural Cleanse settings; defaults are sized for a 32x32, 10-class model on a laptop CPU."""

    steps: int = 150  # optimisation steps per candidate class
    batch_size: int = 24  # clean images per step (each class sees every one)
    lr: float = 0.1  # Adam, betas (0.5, 0.9), as in the NC code
    init_cost: float = 1e-3  # lambda at the start
    success: float = 0.95  # share of a batch sent to c for a mask to count
    patience: int = 5  # steps of success/failure before lambda moves
    classes: int | Sequence[int] | None = None  # None: every class; N: N candidates after a screen; list
    screen_steps: int = 40
    threshold: float = 2.0  # anomaly index above which a class is flagged
    scale: str = "log"  # "log": MAD of log mask norms; "linear": of the norms (Neural Cleanse's own)
    max_batch: int = 512  # images per forward: caps how many classes run together
    seed: int = 0

    def __post_init__(self) -> None:
        _check_scale(self.scale)  # a bad scale or threshold fails before any optimisation runs
        if not self.threshold > 0:
            raise UsageError(f"--anomaly-threshold must be > 0, got {self.threshold}")


@dataclass
class ReversedTrigger:
    """The smallest trigger found for one target class."""

    target: int
    mask: torch.Tensor  # (1, H, W) in [0, 1]
    pattern: torch.Tensor  # (3, H, W) in [0, 1]
    l1: float  # |m|_1 of the kept mask
    train_success: float  # share of the last batches sent to the target when the mask was kept
    refined: bool  # True when the full optimisation ran (not only the screen)

    def to_probe(self, name: str | None = None) -> Probe:
        """Gives back this trigger as a pixel-space image-mask probe aimed at its class."""
        return Probe(
            name or f"nc-class{self.target}",
            "image-mask",
            self.target,
            self.pattern.detach().clone(),
            self.mask.detach().clone(),
            "pixel",
        )


@dataclass
class ReverseResult:
    """Norms, anomaly indices and triggers of a Neural Cleanse run."""

    norms: dict[int, float]  # mask L1 per class, from the pass the anomaly index uses
    anomaly_index: dict[int, float]
    flagged: list[int]
    triggers: dict[int, ReversedTrigger]
    candidates: list[int]  # classes that got the full optimisation
    statistic: str  # "full": index over full runs; "screen": over the screened norms of all classes
    seconds: float
    config: ReverseConfig
    refined_norms: dict[int, float] = field(default_factory=dict)
    anomaly_index_linear: dict[int, float] = field(default_factory=dict)  # Neural Cleanse's own, reported

    def probes(self, classes: Sequence[int] | None = None) -> list[Probe]:
        """Gives back the reversed triggers of the flagged classes (or of `classes`) as probes."""
        chosen = self.flagged if classes is None else list(classes)
        return [self.triggers[c].to_probe() for c in chosen if c in self.triggers]

    def to_json(self) -> dict:
        """Gives back the DESIGN §5 `reverse` object plus norms, candidates and cost."""
        return {
            "anomaly_index": {str(c): round(v, 4) for c, v in self.anomaly_index.items()},
            "flagged": list(self.flagged),
            "scale": self.config.scale,
            "anomaly_index_linear": {str(c): round(v, 4) for c, v in self.anomaly_index_linear.items()},
            "norms": {str(c): round(v, 3) for c, v in self.norms.items()},
            "refined_norms": {str(c): round(v, 3) for c, v in self.refined_norms.items()},
            "candidates": list(self.candidates),
            "statistic": self.statistic,
            "threshold": self.config.threshold,
            "steps": self.config.steps,
            "seconds": round(self.seconds, 2),
        }


def anomaly_indices(norms: dict[int, float], *, scale: str = "linear") -> dict[int, float]:
    """Gives back (median - s) / (1.4826 MAD) per class, s the norm (Neural Cleanse §IV-C) or, with
    `scale="log"`, its logarithm; positive = smaller than usual."""
    _check_scale(scale)
    values = torch.tensor(list(norms.values()), dtype=torch.float64)
    if scale == "log":
        values = values.clamp_min(1e-12).log()
    median = _median(values)
    mad = MAD_CONSISTENCY * _median((values - median).abs())
    mad = max(float(mad), 1e-12)
    return {c: float((median - v) / mad) for c, v in zip(norms, values, strict=True)}


def _check_scale(scale: str) -> None:
    if scale not in ("linear", "log"):
        raise UsageError(f"anomaly scale must be linear or log, got {scale!r}")


def _median(values: torch.Tensor) -> torch.Tensor:
    ordered = values.sort().values
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and no weight gradients while triggers are optimised; both restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with frozen(model):
            yield model
    finally:
        model.train(was_training)


def _optimise(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[int],
    steps: int,
    cfg: ReverseConfig,
    mean,
    std,
    generator: torch.Generator,
    progress: ProgressFn,
    task: str,
    done: int,
    total: int,
) -> tuple[dict[int, ReversedTrigger], int]:
    """Runs NC on `classes` together; gives back their kept triggers and the progress count."""
    dev = placement(model)[0]
    k, (c, h, w) = len(classes), images.shape[1:]
    targets = torch.tensor(classes, device=dev)
    mask_logit = torch.zeros(k, 1, h, w, device=dev, requires_grad=True)  # m = 0.5 at the start
    pattern_logit = (0.1 * torch.randn(k, c, h, w, generator=generator)).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr, betas=(0.5, 0.9))
    cost = torch.full((k,), cfg.init_cost, device=dev)
    up = torch.zeros(k, dtype=torch.long, device=dev)
    down = torch.zeros(k, dtype=torch.long, device=dev)
    best_l1 = torch.full((k,), float("inf"), device=dev)
    best_success = torch.zeros(k, device=dev)
    best_mask = torch.zeros(k, 1, h, w, device=dev)
    best_pattern = torch.zeros(k, c, h, w, device=dev)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (cfg.batch_size,), generator=generator)
        x, y = images[idx].to(dev), labels[idx].to(dev)
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        triggered = (1 - mask[:, None]) * x[None] + mask[:, None] * pattern[:, None]  # (K, B, C, H, W)
        logits = model(normalize(triggered.flatten(0, 1), mean, std)).view(k, len(idx), -1)
        ce = nn.functional.cross_entropy(
            logits.flatten(0, 1), targets.repeat_interleave(len(idx)), reduction="none"
        ).view(k, -1)
        valid = (y[None, :] != targets[:, None]).float()  # images already of class c teach nothing
        ce = (ce * valid).sum(1) / valid.sum(1).clamp_min(1)
        l1 = mask.flatten(1).sum(1)
        opt.zero_grad(set_to_none=True)
        (ce + cost * l1).sum().backward()
        opt.step()
        with torch.no_grad():
            hit = ((logits.argmax(-1) == targets[:, None]).float() * valid).sum(1) / valid.sum(1).clamp_min(1)
            ok = hit >= cfg.success
            better = ok & (l1 < best_l1)
            best_l1 = torch.where(better, l1, best_l1)
            best_success = torch.where(better, hit, best_success)
            best_mask[better], best_pattern[better] = mask[better], pattern[better]
            up = torch.where(ok, up + 1, torch.zeros_like(up))
            down = torch.where(ok, torch.zeros_like(down), down + 1)
            raise_cost, lower_cost = up >= cfg.patience, down >= cfg.patience
            cost = torch.where(raise_cost, cost * 1.5, cost)
            cost = torch.where(lower_cost, (cost / 1.5**1.5).clamp_min(1e-6), cost)
            up, down = torch.where(raise_cost, 0, up), torch.where(lower_cost, 0, down)
        done += k
        progress(task, done, total)
    with torch.no_grad():  # a class never reached the success rate: keep its last mask, marked by success
        never = torch.isinf(best_l1)
        last_mask, last_pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        best_mask[never], best_pattern[never] = last_mask[never], last_pattern[never]
        best_l1 = torch.where(never, last_mask.flatten(1).sum(1), best_l1)
    found = {
        cls: ReversedTrigger(
            cls, best_mask[i].cpu(), best_pattern[i].cpu(), float(best_l1[i]), float(best_success[i]), False
        )
        for i, cls in enumerate(classes)
    }
    return found, done


def _chunks(classes: list[int], per_chunk: int) -> list[list[int]]:
    return [classes[i : i + per_chunk] for i in range(0, len(classes), per_chunk)]


def _resolve_candidates(cfg: ReverseConfig, num_classes: int) -> tuple[list[int] | None, int]:
    """Gives back (explicit class list or None, how many to refine)."""
    if cfg.classes is None:
        return list(range(num_classes)), num_classes
    if isinstance(cfg.classes, int):
        if cfg.classes < 1:
            raise UsageError(f"--classes must be at least 1, got {cfg.classes}")
        if cfg.classes >= num_classes:
            return list(range(num_classes)), num_classes
        return None, cfg.classes
    chosen = sorted({int(c) for c in cfg.classes})
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"classes {bad} are outside the model's 0..{num_classes - 1}")
    if len(chosen) < 3:
        raise UsageError("the anomaly index needs at least 3 classes; name more or pass a number")
    return chosen, len(chosen)


def reverse_engineer(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    mean,
    std,
    config: ReverseConfig | None = None,
    progress: ProgressFn = no_progress,
) -> ReverseResult:
    """Gives back Neural Cleanse's per-class minimal triggers, anomaly indices and flagged classes.

    `images`/`labels` are the defender's clean pixel-space images (the training split, never the test
    split the ASR is reported on). The model is used in eval mode and its weights are left unchanged.
    """
    cfg = config or ReverseConfig()
    if len(labels) == 0:
        raise UsageError("reverse-engineering needs clean images; the dataset given has none")
    explicit, refine_n = _resolve_candidates(cfg, num_classes)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)
    per_chunk = max(1, cfg.max_batch // cfg.batch_size)
    progress_state = {"done": 0, "total": 0}

    def run(classes: list[int], steps: int) -> dict[int, ReversedTrigger]:
        found: dict[int, ReversedTrigger] = {}
        for chunk in _chunks(classes, per_chunk):
            part, progress_state["done"] = _optimise(
                model,
                images,
                labels,
                chunk,
                steps,
                cfg,
                mean,
                std,
                generator,
                progress,
                "reverse",
                progress_state["done"],
                progress_state["total"],
            )
            found.update(part)
        return found

    screened: dict[int, ReversedTrigger] = {}
    with _frozen_eval(model):
        if explicit is None:
            progress_state["total"] = num_classes * cfg.screen_steps + refine_n * cfg.steps
            screened = run(list(range(num_classes)), cfg.screen_steps)
            candidates = sorted(sorted(screened, key=lambda c: screened[c].l1)[:refine_n])
        else:
            candidates = explicit
            progress_state["total"] = len(explicit) * cfg.steps
        refined = run(candidates, cfg.steps)
    for trig in refined.values():
        trig.refined = True
    if screened:
        norms, statistic = {c: t.l1 for c, t in sorted(screened.items())}, "screen"
    else:
        norms, statistic = {c: t.l1 for c, t in sorted(refined.items())}, "full"
    index = anomaly_indices(norms, scale=cfg.scale)
    flagged = sorted((c for c, v in index.items() if v > cfg.threshold), key=lambda c: -index[c])
    triggers = {**screened, **refined}
    return ReverseResult(
        norms=norms,
        anomaly_index=index,
        flagged=flagged,
        triggers=triggers,
        candidates=candidates,
        statistic=statistic,
        seconds=time.perf_counter() - start,
        config=cfg,
        refined_norms={c: t.l1 for c, t in sorted(refined.items())},
        anomaly_index_linear=anomaly_indices(norms),
    )


def class_steps(config: ReverseConfig, num_classes: int) -> int:
    """Gives back how many (class, optimisation step) pairs `reverse_engineer` runs with this config:
    every candidate refined for `steps`, plus the screen of all classes when the candidates are not given."""
    explicit, refine_n = _resolve_candidates(config, num_classes)
    return refine_n * config.steps + (num_classes * config.screen_steps if explicit is None else 0)


def estimate_seconds(
    model: nn.Module,
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    mean,
    std,
    config: ReverseConfig | None = None,
    trial_steps: int = 2,
) -> float:
    """Gives back the estimated wall time of `reverse_engineer` with this config, from a timed trial."""
    cfg = config or ReverseConfig()
    per_chunk = max(1, cfg.max_batch // cfg.batch_size)
    trial_classes = list(range(min(per_chunk, num_classes)))
    dev = placement(model)[0]
    images = torch.rand(cfg.batch_size * 2, *image_shape)
    labels = torch.full((len(images),), -1, dtype=torch.long)  # no image is of a candidate class
    with _frozen_eval(model):
        g = torch.Generator().manual_seed(0)
        _optimise(
            model, images, labels, trial_classes, 1, cfg, mean, std, g, no_progress, "", 0, 0
        )  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        _optimise(model, images, labels, trial_classes, trial_steps, cfg, mean, std, g, no_progress, "", 0, 0)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        per_class_step = (time.perf_counter() - t0) / (trial_steps * len(trial_classes))
    return per_class_step * class_steps(cfg, num_classes)
