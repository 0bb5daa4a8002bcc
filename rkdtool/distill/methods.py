"""Distillation methods as small registered classes (mdistiller's `distillers/_base.py` shape).

A method names its learnable parameters (student plus connectors), pins the teacher to eval (or train,
for `--teacher-bn train`), and its `step` returns the student's logits and a dict of named losses that
the trainer sums and logs. KD, FKD and RobustKD differ only here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.data import normalize, salt_and_pepper
from rkdtool.distill.abd import ShufflingVaccine, sample_weighted_kd
from rkdtool.distill.losses import connector, fkd_loss, fkd_loss_per_sample, fkd_margin, kd_loss
from rkdtool.distill.robustkd import DetoxMasks
from rkdtool.models import FeatureTaps, TapPoint, tap_channels
from rkdtool.probes.uap import apply_pool, synthesise_uap


@dataclass
class MethodOptions:
    temperature: float = 4.0  # KD
    kd_alpha: float = 0.9  # KD: weight of the soft term
    student_noise: float = 0.0  # salt-and-pepper share on the student's input (RobustKD code: 0.1)
    teacher_bn: str = "eval"  # eval (deterministic) | train (the reference code)
    iga_lambda: float = 0.0  # KDIGA's input-gradient alignment weight (0: off), for any method


class Distiller(nn.Module):
    """Base: holds student and teacher; subclasses implement `losses`."""

    name = "base"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_taps: tuple[TapPoint, ...],
        teacher_taps: tuple[TapPoint, ...],
        options: MethodOptions,
        mean,
        std,
    ) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.options, self.mean, self.std = options, tuple(mean), tuple(std)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [
            p for name, p in self.named_parameters() if not name.startswith("teacher.") and p.requires_grad
        ]

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.train(mode and self.options.teacher_bn == "train")
        return self

    def before_epoch(self, epoch: int, data, generator: torch.Generator, device: torch.device) -> None:
        """Runs before each training epoch (with the student in eval mode); most methods do nothing."""

    def student_input(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return normalize(salt_and_pepper(images, self.options.student_noise, generator), self.mean, self.std)

    def step(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gives back the student's logits and the named losses on one pixel-space batch."""
        raise NotImplementedError

    def forward(self, images, labels, generator):
        """`step` (plus the input-gradient alignment term when `iga_lambda` > 0), as the module's forward:
        DistributedDataParallel syncs gradients of what forward ran."""
        logits, losses = self.step(images, labels, generator)
        if self.options.iga_lambda > 0:
            losses["iga"] = self.options.iga_lambda * self.input_gradient_alignment(images, labels)
        return logits, losses

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on a normalised batch (through its detox masks where a method has them)."""
        return self.teacher(x)

    def input_gradient_alignment(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gives back KDIGA's term mean_b ||g_S(x_b) - g_T(x_b)||_2, g = d CE(model(x), y) / dx in pixel space
        (normalisation inside the model, as the PGD attack sees it; algorithms.md §5). g_S keeps its graph
        (double backpropagation through the student); g_T is a constant. CE sums over the batch so that
        each image's gradient is its own loss's, not divided by the batch size."""
        pixels = images.detach()
        x_t = pixels.clone().requires_grad_(True)
        with torch.enable_grad():
            loss_t = nn.functional.cross_entropy(
                _wide(self.teacher_logits(normalize(x_t, self.mean, self.std))), labels, reduction="sum"
            )
            (g_t,) = torch.autograd.grad(loss_t, x_t)
        x_s = pixels.clone().requires_grad_(True)
        loss_s = nn.functional.cross_entropy(
            _wide(self.student(normalize(x_s, self.mean, self.std))), labels, reduction="sum"
        )
        (g_s,) = torch.autograd.grad(loss_s, x_s, create_graph=True)
        return (g_s - g_t.detach()).flatten(1).norm(dim=1).mean()


def halves(t: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gives back t[:n] and t[n:]. A slice's backward builds its gradient in NCHW; for a channels_last `t`
    the gradient is put back into channels_last before it reaches the layer that made `t` (robustkd-ta's
    connectors end in BatchNorm, whose backward on a channels_last input and an NCHW gradient takes a
    mixed-format path: 10.7 ms against 5.9 ms for one 128x16x32x32 forward and backward on one CPU thread)."""
    if t.requires_grad and t.dim() == 4 and not t.is_contiguous():
        if t.is_contiguous(memory_format=torch.channels_last):
            t.register_hook(lambda g: g.contiguous(memory_format=torch.channels_last))
    return t[:n], t[n:]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Gives back `t` in float32 when autocast made it bf16/fp16 (float32 and float64 as they are)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


METHODS: dict[str, type[Distiller]] = {}


def register_method(name: str) -> Callable[[type[Distiller]], type[Distiller]]:
    def wrap(cls: type[Distiller]) -> type[Distiller]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


@register_method("kd")
class HintonKD(Distiller):
    """(1 - alpha) CE + alpha T^2 KL on softened logits (Hinton et al. 2015; the paper's Eqs. 1-4)."""

    def step(self, images, labels, generator):
        with torch.no_grad():
            teacher_logits = self.teacher(normalize(images, self.mean, self.std))
        logits = self.student(self.student_input(images, generator))
        a = self.options.kd_alpha
        return logits, {
            "ce": (1 - a) * nn.functional.cross_entropy(logits.float(), labels),
            "kd": a * kd_loss(logits, teacher_logits, self.options.temperature),
        }


@register_method("kdiga")
class KDIGA(HintonKD):
    """KDIGA (Shao et al., arXiv 2110.12072; algorithms.md §5): Hinton KD plus input-gradient alignment,
    weight `--iga-lambda` (1 by default for this method). It carries a teacher's adversarial robustness,
    not a defence against backdoors; `--iga-lambda` adds the same term to any other method."""


@register_method("abd")
class AntiBackdoorKD(HintonKD):
    """ABD, data-driven (ABD `cmi/vanilla_kd_ood.py`; algorithms.md §4.1): Hinton KD whose soft term is
    mean_kept KD_i - lambda mean_flagged KD_i, the flags from the Shuffling Vaccine (inputs on which shuffled
    teachers still agree with the teacher), and Self-Retrospection as the post-hoc phase (the job runs it).
    With `--data-free` the same two pieces act on ZSKT instead (`distill/datafree.py`)."""

    def __init__(self, student, teacher, student_taps, teacher_taps, options, mean, std, vaccine=None):
        super().__init__(student, teacher, student_taps, teacher_taps, options, mean, std)
        if vaccine is None:
            raise ValueError("abd needs a Shuffling Vaccine")
        self.vaccine: ShufflingVaccine = vaccine  # a plain attribute: the shuffled copies are not learnt
        self.flagged, self.seen = 0, 0  # how many training images SV flagged (tensors once counting)

    def step(self, images, labels, generator):
        x = normalize(images, self.mean, self.std)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
            flags = self.vaccine.suspicious(x, teacher_logits)
            self.flagged, self.seen = (
                self.flagged + flags.sum(),
                self.seen + len(flags),
            )  # read once, at the end
        logits = self.student(self.student_input(images, generator))
        t, a = self.options.temperature, self.options.kd_alpha
        log_p = nn.functional.log_softmax(logits.float() / t, 1)
        log_q = nn.functional.log_softmax(teacher_logits.float() / t, 1)
        per_sample = (log_q.exp() * (log_q - log_p)).sum(1) * t**2  # kd_loss, one value per image
        # a uniform answer's KD, T^2 (log C - H(q)): how far unlearning may take the student from the teacher
        uniform = (log_q.exp() * (log_q + math.log(log_q.shape[1]))).sum(1) * t**2
        return logits, {
            "ce": (1 - a) * nn.functional.cross_entropy(logits.float(), labels),
            "kd": a * sample_weighted_kd(per_sample, flags, self.vaccine.weight, cap=uniform),
        }


@register_method("fkd")
class FeatureKD(Distiller):
    """FKD: CE + margin-ReLU partial L2 at the three pre-ReLU taps through connectors (algorithms.md §1)."""

    def __init__(
        self,
        student,
        teacher,
        student_taps,
        teacher_taps,
        options,
        mean,
        std,
        detox: DetoxMasks | None = None,
        vaccine: ShufflingVaccine | None = None,
    ):
        super().__init__(student, teacher, student_taps, teacher_taps, options, mean, std)
        # --abd-sv: the Shuffling Vaccine re-weights the feature term per image, as abd re-weights KD
        self.vaccine = vaccine  # a plain attribute: the shuffled copies are not learnt
        self.flagged, self.seen = 0, 0
        t_channels = tap_channels(teacher, teacher_taps)
        s_channels = tap_channels(student, student_taps)
        if len(t_channels) != len(s_channels):
            raise ValueError(f"teacher has {len(t_channels)} taps, student {len(s_channels)}")
        self.connectors = nn.ModuleList(connector(s, t) for s, t in zip(s_channels, t_channels, strict=True))
        modules = dict(teacher.named_modules())
        # Margins from the (un-detoxified) teacher BN's gamma and beta, once (algorithms.md §2.1).
        for k, point in enumerate(teacher_taps):
            self.register_buffer(f"margin{k}", fkd_margin(modules[point.margin_module]))
        # Registered as a submodule (moves with .to()); no class-level default, which would shadow it:
        # nn.Module keeps submodules in _modules and only looks there when normal lookup fails.
        self.detox = detox
        if detox is not None:
            for p in detox.parameters():
                p.requires_grad_(False)

    @property
    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{k}") for k in range(len(self.connectors))]

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.detox is None:
            return self.teacher(x)
        with FeatureTaps(self.teacher, self.teacher_taps, rewrite=self.detox.rewrite) as tapper:
            logits, _ = tapper.run(x)
        return logits

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        rewrite = self.detox.rewrite if self.detox is not None else None
        with torch.no_grad(), FeatureTaps(self.teacher, self.teacher_taps, rewrite=rewrite) as tapper:
            _, feats = tapper.run(normalize(images, self.mean, self.std))
        return feats

    def feature_term(self, projected, teacher_feats, images: torch.Tensor) -> torch.Tensor:
        """FKD's feature loss on clean images; with a vaccine (--abd-sv), mean over the images SV keeps
        minus lambda times the mean over those it flags (ABD's sample re-weighting, on features)."""
        if self.vaccine is None:
            return fkd_loss(projected, teacher_feats, self.margins)
        with torch.no_grad():
            x = normalize(images, self.mean, self.std)
            flags = self.vaccine.suspicious(x, self.teacher(x))
            self.flagged, self.seen = self.flagged + flags.sum(), self.seen + len(flags)
        per_image = fkd_loss_per_sample(projected, teacher_feats, self.margins)
        # a blank feature's loss: how far unlearning may take the student's features from the teacher's
        blank = fkd_loss_per_sample([torch.zeros_like(p) for p in projected], teacher_feats, self.margins)
        return sample_weighted_kd(per_image, flags, self.vaccine.weight, cap=blank)

    def step(self, images, labels, generator):
        teacher_feats = self.teacher_features(images)
        with FeatureTaps(self.student, self.student_taps) as tapper:
            logits, student_feats = tapper.run(self.student_input(images, generator))
        projected = [c(f) for c, f in zip(self.connectors, student_feats, strict=True)]
        return logits, {
            "ce": nn.functional.cross_entropy(logits.float(), labels),
            "feature": self.feature_term(projected, teacher_feats, images),
        }


@register_method("robustkd")
class RobustKD(FeatureKD):
    """FKD against the detoxified teacher (Eq. 7 masks fitted beforehand), student input noise on."""


@register_method("robustkd-ta")
class TriggerAwareRobustKD(FeatureKD):
    """RobustKD made trigger-aware: FKD from the (detoxified) teacher's clean-image features, also on the
    same images carrying a synthesised trigger stand-in (trigger-consistency distillation).

    Loss (defence.md §3): CE(s(x), y) + FKD(s(x), t(x)) + FKD(s(x~), t(x)) + KL(p_t(x) || p_s(x~)), where
    x~ is x with one stand-in drawn per sample from `pool` (synthesised perturbations, bank probes,
    reverse-engineered triggers: anything with `apply(images)`) and t(x) the teacher's taps on the clean x,
    through the detox masks when given. The student learns that the stand-ins change nothing, which is what
    removes a backdoor they cover. With `refresh_every` = k > 0, every k epochs a universal perturbation is
    also synthesised against the student itself (what it has copied so far) and joins the pool.
    """

    def __init__(
        self,
        student,
        teacher,
        student_taps,
        teacher_taps,
        options,
        mean,
        std,
        detox=None,
        pool=(),
        refresh_every: int = 0,
        refresh_steps: int = 30,
        refresh_budget: float = 0.2,
        refresh_kind: str = "linf1",
        vaccine=None,
    ):
        super().__init__(
            student, teacher, student_taps, teacher_taps, options, mean, std, detox=detox, vaccine=vaccine
        )
        if not pool:
            raise ValueError("robustkd-ta needs a pool of trigger stand-ins")
        self.pool = list(pool)
        self.refresh_every, self.refresh_steps = refresh_every, refresh_steps
        self.refresh_budget, self.refresh_kind = refresh_budget, refresh_kind
        self.refreshed: list = []

    def before_epoch(self, epoch, data, generator, device):
        if not self.refresh_every or epoch == 0 or epoch % self.refresh_every:
            return

        self.refreshed = [
            synthesise_uap(
                self.student,
                data,
                kind=self.refresh_kind,
                budget=self.refresh_budget,
                epochs=1,
                max_steps=self.refresh_steps,
                generator=generator,
                device=device,
            )
        ]

    def step(self, images, labels, generator):
        rewrite = self.detox.rewrite if self.detox is not None else None
        with torch.no_grad(), FeatureTaps(self.teacher, self.teacher_taps, rewrite=rewrite) as tapper:
            teacher_logits, teacher_feats = tapper.run(normalize(images, self.mean, self.std))
        perturbed = apply_pool(self.pool + self.refreshed, images, generator)
        both = torch.cat([self.student_input(images, generator), normalize(perturbed, self.mean, self.std)])
        with FeatureTaps(self.student, self.student_taps) as tapper:
            logits_both, feats_both = tapper.run(both)
        n = len(images)
        projected = [c(f) for c, f in zip(self.connectors, feats_both, strict=True)]
        clean_proj, pert_proj = zip(*(halves(p, n) for p in projected), strict=True)
        logits, pert_logits = logits_both[:n], logits_both[n:]
        consistency = nn.functional.kl_div(
            nn.functional.log_softmax(pert_logits.float(), 1),
            nn.functional.log_softmax(teacher_logits.float(), 1),
            log_target=True,
            reduction="batchmean",
        )
        return logits, {
            "ce": nn.functional.cross_entropy(logits.float(), labels),
            "feature": self.feature_term(clean_proj, teacher_feats, images),
            "feature_triggered": fkd_loss(pert_proj, teacher_feats, self.margins),
            "consistency": consistency,
        }
