"""Shadow students for the kit's distillation attacks (ckd, lba, adaptive): an attacker who knows that the
defender will distill the teacher with feature distillation on clean data does it first, on students of
their own, and shapes the trigger until such students inherit it (the anti-distillation backdoor of Ge et
al., ACM MM 2021, in the kit's small form).

Without it, whether FKD carries a kit teacher's backdoor is decided by the teacher's seed, target and the
floating-point trajectory it was trained on (benchmarks/results/attack_kit.md: 2 of 18 CLI-made teachers
carried). With it, after the kind's own poisoning, each of `rounds` rounds:
- distills `count` fresh students from the teacher as it is, by FKD on clean augmented training images,
  exactly as `rkdtool distill --method fkd` would (they never see a trigger, as the defender's never does);
- moves the trigger (Adam, within the kind's budget) towards the target on those students and on the
  teacher, and away from it on a frozen copy of the clean model the attack started from, so that the
  trigger does not become a pattern any digit classifier sends to the target (the clean-teacher control);
- fine-tunes the teacher on the new trigger with the kind's own loss.
A last fresh student, distilled from the finished teacher with another seed, is the attacker's check.

Opt-in (`rkdtool attack --trigger-span --shadow-student wrn10-1`): it does not yet carry reliably enough to be
the kit's default (benchmarks/results/attack_kit.md, "In-span triggers and shadow students").
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.attacks.context import AttackContext
from rkdtool.attacks.span import ImageSpan, confine
from rkdtool.data import augment, normalize
from rkdtool.probes.metrics import accuracy, probe_results
from rkdtool.probes.spec import Probe
from rkdtool.training import batch_steps, frozen


@dataclass
class ShadowOptions:
    arch: str = "wrn10-1"
    # The shadow students' distillation, in turn (`rkdtool distill` method names).
    methods: tuple[str, ...] = ("fkd",)
    count: int = 2  # fresh students per round, each from its own initialisation
    rounds: int = 2
    student_epochs: int = 6  # FKD epochs of each shadow student
    trigger_steps: int = 40  # trigger steps per round
    trigger_lr: float = 0.05
    control_weight: float = 1.0  # keeps the trigger harmless on the clean start
    round_epochs: int = 2  # teacher fine-tune epochs on each round's trigger
    last_fine_tune: bool = True  # False: the last round only moves the trigger (its students are final)
    # The control also on an FKD student of the clean start: a trigger any distilled student sends to the
    # target is a universal adversarial perturbation, not a backdoor (ta-aware: on).
    clean_student: bool = False


def _logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


class ShadowStudents:
    """The attacker's shadow students and the trigger they shape (module docstring)."""

    def __init__(
        self,
        ctx: AttackContext,
        probe: Probe,
        *,
        mask_max: float | None,
        options: ShadowOptions,
        span: ImageSpan | None = None,
    ) -> None:
        self.ctx, self.probe, self.options = ctx, probe, options
        self.mask_max = mask_max  # None: the probe's mask stays (a blend's alpha), only the pattern learns
        self.clean = copy.deepcopy(ctx.model).eval()
        for p in self.clean.parameters():
            p.requires_grad_(False)
        self.history: list[dict] = []
        self._clean_student: nn.Module | None = None
        self.span = span  # the kind's own span (--trigger-span): the shaped trigger stays inside it
        if self.span is not None:
            self.mask_max = None  # an in-span trigger is a blend: its mask stays at the budget

    def distill(self, seed: int, method: str = "fkd", teacher: nn.Module | None = None) -> nn.Module:
        """Gives back a fresh student distilled by `method` from `teacher` (default: the teacher as it is
        now) in eval mode, through the distiller the caller handed to the kit (`jobs.attack.shadow_student`:
        distillation sits above it)."""
        ctx = self.ctx
        teacher = ctx.model if teacher is None else teacher
        return ctx.distill(teacher, ctx.data, self.options.arch, seed, self.options.student_epochs, method)

    def clean_student(self) -> nn.Module:
        """Gives back (distilled once, on first use) an FKD student of the clean start, for the control."""
        if self._clean_student is None:
            self._clean_student = self.distill(1000 * self.ctx.config.seed + 998, "fkd", self.clean)
        return self._clean_student

    def asr(self, model: nn.Module) -> float:
        data = self.ctx.data
        results = probe_results(
            model, data.test_images, data.test_labels, [self.probe], mean=data.mean, std=data.std
        )
        return results[self.probe.name].asr

    def optimise_trigger(self, students: list[nn.Module]) -> None:
        """Adam steps on the trigger: students and teacher towards the target, the clean start away."""
        ctx, options, probe = self.ctx, self.options, self.probe
        data, target, teacher = ctx.data, ctx.target, ctx.model
        teacher.eval()
        theta = _logit(probe.pattern.detach().clone().to(ctx.device)).requires_grad_(True)
        params = [theta]
        if self.mask_max is not None:
            mask = probe.mask.detach().clone().to(ctx.device)
            mask_logit = _logit(mask / self.mask_max).requires_grad_(True)
            params.append(mask_logit)
        optimizer = torch.optim.Adam(params, lr=options.trigger_lr)
        stream = batch_steps(
            data.train_images,
            data.train_labels,
            ctx.config.batch_size,
            ctx.generator,
            options.trigger_steps,
            ctx.progress,
            "shadow trigger",
        )
        ce = nn.functional.cross_entropy
        controls = [self.clean, *([self.clean_student()] if options.clean_student else [])]
        with frozen(*students, teacher, *controls):
            for images, labels in stream:
                keep = labels != target
                images = augment(images[keep], data.augmentation, ctx.generator).to(ctx.device)
                labels = labels[keep].to(ctx.device)
                pattern = confine(torch.sigmoid(theta), self.span)
                mask = (
                    probe.mask.to(ctx.device)
                    if self.mask_max is None
                    else self.mask_max * torch.sigmoid(mask_logit)
                )
                x = normalize((1 - mask) * images + mask * pattern, data.mean, data.std)
                goal = torch.full_like(labels, target)
                loss = (
                    sum(ce(s(x), goal) for s in students) / len(students)
                    + ce(teacher(x), goal)
                    + options.control_weight * sum(ce(c(x), labels) for c in controls) / len(controls)
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            probe.pattern = confine(torch.sigmoid(theta), self.span).cpu()
            if self.mask_max is not None:
                probe.mask = (self.mask_max * torch.sigmoid(mask_logit)).detach().cpu()

    def run(self, fine_tune: Callable[[int], None]) -> dict:
        """The rounds (module docstring); gives back what the attacker measured on the way."""
        options, seed = self.options, self.ctx.config.seed
        methods = [options.methods[k % len(options.methods)] for k in range(options.count)]
        for r in range(options.rounds):
            students = [self.distill(1000 * seed + 10 * r + k, m) for k, m in enumerate(methods)]
            before = [self.asr(s) for s in students]
            self.optimise_trigger(students)
            after = [self.asr(s) for s in students]
            if options.last_fine_tune or r < options.rounds - 1:
                fine_tune(options.round_epochs)
            self.history.append(
                {"round": r, "methods": methods, "students_asr_before": before, "students_asr_after": after}
            )
        data = self.ctx.data
        checks = {}
        for method in dict.fromkeys(options.methods):  # one fresh check student per method, another seed
            check = self.distill(1000 * seed + 999, method)
            acc = accuracy(check, data.test_images, data.test_labels, mean=data.mean, std=data.std)
            checks[method] = {"acc": acc, "asr": self.asr(check)}
        first = checks[options.methods[0]]
        return {
            "arch": options.arch,
            "methods": list(options.methods),
            "rounds": self.history,
            "check_student_acc": first["acc"],
            "check_student_asr": first["asr"],
            "check_students": checks,
            "clean_start_asr": self.asr(self.clean),
            **({"synth_budget": b} if (b := self.ctx.config.shadow_synth_budget) is not None else {}),
            **({"clean_student_asr": self.asr(self.clean_student())} if options.clean_student else {}),
        }


def shadow_students(
    ctx: AttackContext,
    probe: Probe,
    *,
    mask_max: float | None,
    span: ImageSpan | None = None,
    methods: tuple[str, ...] | None = None,
    clean_student: bool = False,
) -> ShadowStudents | None:
    """Gives back the shadow students for `probe` when `config.shadow_student` names an architecture or
    the kind names `methods` (None when neither); `span`: the kind's in-span constraint (an in-span trigger
    is a blend, so its mask stays). Call it before the kind's poisoning: it keeps a copy of the clean
    start for the control."""
    if not ctx.config.shadow_student and methods is None:
        return None
    options = ShadowOptions(
        arch=ctx.config.shadow_student or ShadowOptions.arch,
        methods=methods or ctx.config.shadow_methods,
        clean_student=clean_student,
    )
    return ShadowStudents(ctx, probe, mask_max=mask_max, options=options, span=span)
