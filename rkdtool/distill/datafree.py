"""Data-free distillation (`--data-free`): ZSKT (Micaelli & Storkey, NeurIPS 2019), the setting of ABD's
table (algorithms.md §4.2, "ZSKT base hyper-parameters"), with ABD's Shuffling Vaccine in the generator's loss
and Self-Retrospection as the post-hoc phase.

A generator maps noise z to images in the teacher's input space; it is trained adversarially: the generator
maximises the teacher/student disagreement KL(T || S), the student minimises it plus beta times the attention
transfer term (Zagoruyko & Komodakis 2017) at the taps. On digits the generator also keeps the teacher's
classes balanced over each batch (DAFL's information-entropy term; `default_data_free_recipe` says why).
The student never sees a real training image; the test split only measures it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rkdtool.data import ImageData
from rkdtool.distill.abd import RetrospectionOptions, ShufflingVaccine, batch_kl, retrospection_step
from rkdtool.distill.trainer import evaluate_student
from rkdtool.models import FeatureTaps, TapPoint, parse_arch
from rkdtool.probes.spec import Probe
from rkdtool.training import ProgressFn, no_progress
from rkdtool.weights import atomic_path


class ImageGenerator(nn.Module):
    """ZSKT's generator: z -> linear -> 128 x s/4 x s/4 -> BN -> (up x2, conv 3x3, BN, LeakyReLU 0.2) twice
    (128 then 64 channels) -> conv to the image's channels -> BN without affine (images in the teacher's
    normalised input space, as ZSKT's generator emits them)."""

    def __init__(self, z_dim: int = 100, size: int = 32, channels: int = 3) -> None:
        super().__init__()
        if size % 4:
            raise ValueError(f"image size must be a multiple of 4, got {size}")
        self.z_dim, self.start = z_dim, size // 4
        self.project = nn.Linear(z_dim, 128 * self.start**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(128),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.BatchNorm2d(128),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.LeakyReLU(0.2),
            nn.Conv2d(64, channels, 3, padding=1),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(len(z), 128, self.start, self.start))


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Gives back the L2-normalised spatial attention mean_c f^2, flattened (Zagoruyko & Komodakis 2017)."""
    return nn.functional.normalize(features.float().pow(2).mean(1).flatten(1))


def attention_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gives back sum_k mean (a(S_k) - a(T_k))^2 over the taps' stage outputs (ZSKT's `attention_diff`); a
    larger map is average-pooled to the smaller one's size first (students of another family)."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student, teacher, strict=True):
        size = min(s.shape[-1], t.shape[-1])
        s, t = nn.functional.adaptive_avg_pool2d(s, size), nn.functional.adaptive_avg_pool2d(t, size)
        total = total + (attention_map(s) - attention_map(t.detach())).pow(2).mean()
    return total


@dataclass
class DataFreeRecipe:
    """ZSKT's schedule, in `epochs` chunks of rounds (one round: a pseudo batch, `generator_steps` generator
    steps and `student_steps` student steps on it). The paper's budget is 80,000 rounds of 128; digits on a
    CPU gets a few thousand of 64 (`default_data_free_recipe`)."""

    epochs: int = 10
    rounds_per_epoch: int = 100
    batch_size: int = 128
    student_steps: int = 10
    generator_steps: int = 1
    student_lr: float = 2e-3
    generator_lr: float = 1e-3
    beta: float = 250.0  # attention-transfer weight
    balance: float = 0.0  # weight of the class-imbalance term in the generator loss (0: ZSKT as published)
    clip: float = 5.0  # gradient-norm clipping of both
    z_dim: int = 100
    eval_every: int = 1
    retrospection_rounds: int = 0  # SR's post-hoc phase (ABD): rounds at lr 5e-4 after the schedule

    @property
    def rounds(self) -> int:
        return self.epochs * self.rounds_per_epoch


def default_data_free_recipe(data: ImageData, epochs: int | None, batch_size: int) -> DataFreeRecipe:
    """Gives back ZSKT's recipe at the paper's budget (80,000 rounds of 128, in 200 chunks), or the digits
    budget measured to fit a CPU: 10 chunks of 60 rounds of `batch_size`, 5 student steps a round, and the
    class-balance term at DAFL's weight 5: without it the generator collapsed onto images the demo's clean
    WRN-16-1 finds ambiguous and the WRN-10-1 student stayed at 10% (3 seeds of 3; with it 74-79% after 60
    rounds; AMD EPYC, 1 thread)."""
    if data.name == "digits":
        return DataFreeRecipe(
            epochs=epochs or 10, rounds_per_epoch=60, batch_size=batch_size, student_steps=5, balance=5.0
        )
    return DataFreeRecipe(epochs=epochs or 200, rounds_per_epoch=400, batch_size=128)


def class_imbalance(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Gives back log C - H(mean_b softmax(z_b)): 0 when the teacher's classes are used evenly over the
    batch, log C when one class takes every image (DAFL's information-entropy loss, Chen et al., ICCV 2019,
    shifted to be >= 0)."""
    mean_p = teacher_logits.float().softmax(1).mean(0)
    entropy = -(mean_p * mean_p.clamp_min(1e-12).log()).sum()
    return math.log(len(mean_p)) - entropy


class DataFreeDistiller(nn.Module):
    """The student, the generator and the frozen teacher of a data-free run (the vaccine when ABD is on)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        student_taps: tuple[TapPoint, ...],
        teacher_taps: tuple[TapPoint, ...],
        *,
        size: int,
        z_dim: int = 100,
        beta: float = 250.0,
        vaccine: ShufflingVaccine | None = None,
        balance: float = 0.0,
    ) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher.eval()
        self.generator = ImageGenerator(z_dim, size)
        self.student_taps, self.teacher_taps = student_taps, teacher_taps
        self.beta, self.vaccine = beta, vaccine
        self.balance = balance
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> DataFreeDistiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with FeatureTaps(self.teacher, self.teacher_taps) as tapper:
            logits, _ = tapper.run(x)
            return logits, list(tapper.stages)

    def generator_loss(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator maximises KL(T || S) on its images (ZSKT), plus `balance` times the teacher's class
        imbalance over the batch when set, plus L_SV when the vaccine is on."""
        x = self.generator(z)
        teacher_logits = self.teacher(x)
        losses = {"adversarial": -batch_kl(self.student(x), teacher_logits)}
        if self.balance:
            losses["balance"] = self.balance * class_imbalance(teacher_logits)
        if self.vaccine is not None:
            losses["vaccine"] = self.vaccine.loss(x, teacher_logits)
        return losses

    def student_loss(self, x: torch.Tensor, teacher_logits, teacher_stages) -> dict[str, torch.Tensor]:
        with FeatureTaps(self.student, self.student_taps) as tapper:
            logits, _ = tapper.run(x)
            stages = list(tapper.stages)
        return {
            "kd": batch_kl(logits, teacher_logits),
            "attention": self.beta * attention_loss(stages, teacher_stages),
        }


EpochLog = Callable[[dict], None]


def _cosine(base: float, done: int, total: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * done / max(1, total)))


def train_data_free(
    distiller: DataFreeDistiller,
    data: ImageData,
    recipe: DataFreeRecipe,
    probes: Sequence[Probe],
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    on_epoch: EpochLog | None = None,
    checkpoint=None,
    task: str = "student",
    retrospection: RetrospectionOptions | None = None,
) -> dict:
    """Gives back the final evaluation of a student distilled from noise alone (trained in place).

    Reads only `data`'s test split (and its name and size). Adam for both, cosine-annealed over the rounds,
    gradient norms clipped (ZSKT). With `retrospection`, SR's post-hoc phase follows for
    `recipe.retrospection_rounds` rounds on generated batches. Checkpoints after each chunk, as the
    data-driven trainer does, and resumes from one.
    """
    distiller.to(device)
    student, image_generator = distiller.student, distiller.generator
    student_opt = torch.optim.Adam(student.parameters(), lr=recipe.student_lr)
    generator_opt = torch.optim.Adam(image_generator.parameters(), lr=recipe.generator_lr)
    start_epoch = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("task") == task:
            distiller.load_state_dict(state["distiller"], strict=False)
            student_opt.load_state_dict(state["student_optimizer"])
            generator_opt.load_state_dict(state["generator_optimizer"])
            generator.set_state(state["generator"])
            start_epoch = int(state["epoch"]) + 1
    total = recipe.rounds + recipe.retrospection_rounds
    seconds = []
    for epoch in range(start_epoch, recipe.epochs):
        began = time.perf_counter()
        distiller.train()
        sums: dict[str, torch.Tensor] = {}
        for i in range(recipe.rounds_per_epoch):
            done = epoch * recipe.rounds_per_epoch + i
            for opt, base in ((student_opt, recipe.student_lr), (generator_opt, recipe.generator_lr)):
                for group in opt.param_groups:
                    group["lr"] = _cosine(base, done, recipe.rounds)
            z = torch.randn(recipe.batch_size, recipe.z_dim, generator=generator).to(device)
            for _ in range(recipe.generator_steps):
                losses = distiller.generator_loss(z)
                generator_opt.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                nn.utils.clip_grad_norm_(image_generator.parameters(), recipe.clip)
                generator_opt.step()
            with torch.no_grad():
                x = image_generator(z)
                teacher_logits, teacher_stages = distiller.teacher_outputs(x)
            for _ in range(recipe.student_steps):
                student_losses = distiller.student_loss(x, teacher_logits, teacher_stages)
                student_opt.zero_grad(set_to_none=True)
                sum(student_losses.values()).backward()
                nn.utils.clip_grad_norm_(student.parameters(), recipe.clip)
                student_opt.step()
            for name, value in {**losses, **student_losses}.items():
                sums[name] = sums.get(name, 0) + value.detach()
            progress(task, done + 1, total)
        seconds.append(time.perf_counter() - began)
        distiller.eval()
        evaluated = (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs
        result = evaluate_student(student, data, probes) if evaluated else {}
        if on_epoch is not None:
            on_epoch(
                {
                    "task": task,
                    "epoch": epoch + 1,
                    "lr": student_opt.param_groups[0]["lr"],
                    "loss": {k: float(v) / recipe.rounds_per_epoch for k, v in sums.items()},
                    **result,
                    "seconds": seconds[-1],
                }
            )
        if checkpoint is not None:
            tmp = atomic_path(checkpoint)
            torch.save(
                {
                    "task": task,
                    "epoch": epoch,
                    "distiller": {
                        k: v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")
                    },
                    "student_optimizer": student_opt.state_dict(),
                    "generator_optimizer": generator_opt.state_dict(),
                    "generator": generator.get_state(),
                },
                tmp,
            )
            os.replace(tmp, checkpoint)
    before = None
    if retrospection is not None and recipe.retrospection_rounds:
        distiller.eval()
        measured = evaluate_student(student, data, probes)
        before = {"acc": measured["acc"], "asr": measured["asr"]}
        self_retrospect(distiller, recipe, retrospection, generator, device, progress, task)
    distiller.eval()
    final = evaluate_student(student, data, probes)
    if before is not None:
        final["before_retrospection"] = before
    final["epochs"] = recipe.epochs
    final["rounds"] = recipe.rounds
    final["seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else None
    return final


def self_retrospect(
    distiller: DataFreeDistiller,
    recipe: DataFreeRecipe,
    options: RetrospectionOptions,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn,
    task: str,
) -> None:
    """SR's post-hoc phase on generated batches (the generator as the schedule left it): each round, the
    student's KD step on the batch plus the unlearning hypergradient of a perturbation synthesised on the
    teacher, with Adam at lr 5e-4 (ABD resumes ZSKT at 5e-4)."""
    student = distiller.student
    optimizer = torch.optim.Adam(student.parameters(), lr=options.lr)
    distiller.train()
    for i in range(recipe.retrospection_rounds):
        z = torch.randn(recipe.batch_size, recipe.z_dim, generator=generator).to(device)
        with torch.no_grad():
            x = distiller.generator(z)
            teacher_logits, teacher_stages = distiller.teacher_outputs(x)

        def criterion(x=x, teacher_logits=teacher_logits, teacher_stages=teacher_stages) -> torch.Tensor:
            return sum(distiller.student_loss(x, teacher_logits, teacher_stages).values())

        retrospection_step(student, distiller.teacher, x, criterion, optimizer, options, generator)
        progress(task, recipe.rounds + i + 1, recipe.rounds + recipe.retrospection_rounds)


def retrospection_length(length: int) -> int:
    """Gives back how long SR's post-hoc phase runs: 2.5% of the schedule (epochs, or rounds when data-free),
    at least one (ABD resumes CMI's 200 epochs at 197 or 198, ZSKT's 80,000 rounds a few hundred before the
    end)."""
    return max(1, round(0.025 * length))


def prepare_data_free(
    method: str,
    student: nn.Module,
    teacher: nn.Module,
    teacher_arch: str,
    student_arch: str,
    data: ImageData,
    *,
    epochs: int | None,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[DataFreeDistiller, DataFreeRecipe, RetrospectionOptions | None]:
    """Gives back a data-free distiller, its recipe and SR's options: plain ZSKT for `kd`, ZSKT with the
    Shuffling Vaccine in the generator loss and Self-Retrospection after for `abd`. The vaccine gets no
    tail-ratio check here: ABD's ZSKT runs have none (pseudo_test_batches = 0)."""
    recipe = default_data_free_recipe(data, epochs, batch_size)
    vaccine, options = None, None
    if method == "abd":
        vaccine = ShufflingVaccine(teacher, generator=generator)
        options = RetrospectionOptions()
        recipe.retrospection_rounds = retrospection_length(recipe.rounds)
    size = data.test_images.shape[-1]
    distiller = DataFreeDistiller(
        student,
        teacher,
        parse_arch(student_arch).taps,
        parse_arch(teacher_arch).taps,
        size=size,
        z_dim=recipe.z_dim,
        beta=recipe.beta,
        vaccine=vaccine,
        balance=recipe.balance,
    )
    return distiller, recipe, options
