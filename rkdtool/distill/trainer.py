"""The distillation loop shared by every method: SGD recipe, per-epoch evaluation, checkpoints."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rkdtool.data import ImageData, augment, normalize
from rkdtool.distill.abd import RetrospectionOptions, retrospection_step
from rkdtool.distill.methods import Distiller
from rkdtool.probes.metrics import accuracy, probe_results
from rkdtool.probes.spec import Probe
from rkdtool.ranks import Ranks, wrap_learner
from rkdtool.training import ProgressFn, batches, no_progress, set_lr, sgd, step_lr, steps_per_epoch
from rkdtool.weights import atomic_path


@dataclass
class StudentRecipe:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    eval_every: int = 1  # evaluate ACC/ASR every N epochs (and always after the last)
    amp: bool = False  # autocast: bf16 on CPU; bf16 on CUDA where supported, else fp16 with a GradScaler
    channels_last: bool = False  # NHWC memory format for teacher, student and batches
    # The training split's largest size kept on an accelerator (150 MB: CIFAR-100 as uint8 is 150 MB, as
    # float32 600 MB); batches are then drawn and augmented there, with the seeded CPU generator's draws.
    device_data_limit_mb: float = 1024.0


def default_channels_last(device: torch.device) -> bool:
    """Gives back whether the student trains in NHWC on `device` when not told: on the CPU, where oneDNN's
    NHWC convolutions ran 1.21-1.30x the NCHW steps per second (benchmarks/results/throughput.md, AVX-512
    and AVX2 kernels, 1 and 2 threads); not on CUDA, until benchmarks/gpu_check.py has measured it there."""
    return device.type == "cpu"


def amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """Gives back the autocast dtype `--amp` means on `device` (None: autocast off)."""
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def training_split(data: ImageData, device: torch.device, limit_mb: float):
    """Gives back (images, labels) of the training split, moved to `device` once when it is an
    accelerator and the split fits in `limit_mb`, so that no step waits for a host copy."""
    images, labels = data.train_images, data.train_labels
    if device.type != "cpu" and images.numel() * images.element_size() <= limit_mb * 2**20:
        return images.to(device), labels.to(device)
    return images, labels


EpochLog = Callable[[dict], None]


def evaluate_student(student, data: ImageData, probes: Sequence[Probe]) -> dict:
    """Gives back {'acc', 'asr': {probe: value}, 'asr_all_images': {...}} on the test split."""
    acc = accuracy(student, data.test_images, data.test_labels, mean=data.mean, std=data.std)
    results = probe_results(student, data.test_images, data.test_labels, probes, mean=data.mean, std=data.std)
    return {
        "acc": acc,
        "asr": {name: r.asr for name, r in results.items()},
        "asr_all_images": {name: r.asr_all_images for name, r in results.items()},
    }


def train_step(
    learner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, torch.Tensor]:
    """Runs one optimisation step of a distiller (or its DDP wrapper) on a device batch; gives back the
    named losses (float32). `dtype`: the autocast dtype (None: off); `scaler`: fp16's GradScaler."""
    device_type = images.device.type
    with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        _, losses = learner(images, labels, generator)
    losses = {k: v.float() for k, v in losses.items()}
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return losses


def train_student(
    distiller: Distiller,
    data: ImageData,
    recipe: StudentRecipe,
    probes: Sequence[Probe],
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    on_epoch: EpochLog | None = None,
    checkpoint: Path | None = None,
    task: str = "student",
    ranks: Ranks = Ranks(),
) -> dict:
    """Gives back the final evaluation of the distilled student (trained in place), with timings.

    With `checkpoint`, the state after each epoch is written there (atomically) and an existing one is
    resumed from; it holds only tensors and numbers, so it loads with `torch.load(weights_only=True)`.
    One function (about 100 lines) because it is the epoch loop itself: resume, train, evaluate, checkpoint.

    Under torchrun (`ranks`): every rank draws the same global batch and augmentation from the shared
    `generator`, trains on its shard through DDP, and draws its step's own noise from a generator of
    (epoch, rank); only rank 0 evaluates, logs and writes the checkpoint.
    """
    if recipe.eval_every < 1:
        raise ValueError("eval_every must be >= 1")
    distiller.to(device)
    if recipe.channels_last:
        distiller.to(memory_format=torch.channels_last)
    dtype = amp_dtype(device, recipe.amp)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    optimizer = sgd(distiller.learnable_parameters(), recipe.lr, recipe.weight_decay)
    start_epoch = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("task") == task:
            distiller.load_state_dict(state["distiller"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            if "torch_rng" in state:  # the global generator (student noise, dropout-like draws)
                torch.set_rng_state(state["torch_rng"])
            if scaler is not None and "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            start_epoch = int(state["epoch"]) + 1
    learner = wrap_learner(distiller, ranks, device)
    train_images, train_labels = training_split(data, device, recipe.device_data_limit_mb)
    layout = torch.channels_last if recipe.channels_last else torch.contiguous_format
    per_epoch = steps_per_epoch(len(data.train_labels), recipe.batch_size)
    total = recipe.epochs * per_epoch
    seconds = []
    for epoch in range(start_epoch, recipe.epochs):
        began = time.perf_counter()
        set_lr(optimizer, step_lr(recipe.lr, epoch, recipe.epochs))
        distiller.eval()
        distiller.before_epoch(epoch, data, generator, device)
        if ranks.distributed and getattr(distiller, "refreshed", None):  # stand-ins made against the student
            distiller.refreshed = ranks.from_main(distiller.refreshed)
        step_generator = generator
        if ranks.distributed:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))  # same draw on every rank
            step_generator = torch.Generator().manual_seed(seed + ranks.rank)
        distiller.train()
        sums: dict[str, torch.Tensor] = {}
        for i, (images, labels) in enumerate(
            batches(train_images, train_labels, recipe.batch_size, generator)
        ):
            images = augment(images, data.augmentation, generator)
            images = ranks.shard(images).to(device, memory_format=layout)
            labels = ranks.shard(labels).to(device)
            losses = train_step(
                learner, optimizer, images, labels, step_generator, dtype=dtype, scaler=scaler
            )
            for name, value in losses.items():  # accumulate on device; read once per epoch
                sums[name] = sums.get(name, 0) + value.detach()
            progress(task, epoch * per_epoch + i + 1, total)
        seconds.append(time.perf_counter() - began)
        distiller.eval()
        sums = {k: ranks.mean(v) for k, v in sums.items()}
        if not ranks.main:
            continue
        evaluated = (epoch + 1) % recipe.eval_every == 0 or epoch + 1 == recipe.epochs
        result = evaluate_student(distiller.student, data, probes) if evaluated else {}
        if on_epoch is not None:
            on_epoch(
                {
                    "task": task,
                    "epoch": epoch + 1,
                    "lr": optimizer.param_groups[0]["lr"],
                    "loss": {k: float(v) / per_epoch for k, v in sums.items()},
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
                    "distiller": {  # the teacher is frozen and reloaded from its reference
                        k: v for k, v in distiller.state_dict().items() if not k.startswith("teacher.")
                    },
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    **({"scaler": scaler.state_dict()} if scaler is not None else {}),
                },
                tmp,
            )
            os.replace(tmp, checkpoint)
    distiller.eval()
    if recipe.channels_last:  # the student leaves (saved, exported, probed) in the usual NCHW layout
        distiller.to(memory_format=torch.contiguous_format)
    final = evaluate_student(distiller.student, data, probes) if ranks.main else {}
    final["epochs"] = recipe.epochs
    final["seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else None
    return final


def retrospect(
    distiller: Distiller,
    data: ImageData,
    recipe: StudentRecipe,
    *,
    epochs: int,
    generator: torch.Generator,
    device: torch.device,
    options: RetrospectionOptions | None = None,
    progress: ProgressFn = no_progress,
    task: str = "self-retrospection",
) -> None:
    """Runs ABD's Self-Retrospection as a post-hoc phase on the training split (algorithms.md §4.2): each
    step, the method's own loss on the batch plus the hypergradient that unlearns a perturbation synthesised
    on the teacher, by SGD at lr 5e-4 (ABD resumes a near-final checkpoint at 5e-4), `epochs` epochs."""
    options = options or RetrospectionOptions()
    distiller.to(device)
    optimizer = sgd(distiller.learnable_parameters(), options.lr, recipe.weight_decay)
    per_epoch = steps_per_epoch(len(data.train_labels), recipe.batch_size)
    distiller.train()
    for epoch in range(epochs):
        for i, (images, labels) in enumerate(
            batches(data.train_images, data.train_labels, recipe.batch_size, generator)
        ):
            images = augment(images, data.augmentation, generator).to(device)
            labels = labels.to(device)

            def criterion(images=images, labels=labels) -> torch.Tensor:
                return sum(distiller(images, labels, generator)[1].values())

            x = normalize(images, distiller.mean, distiller.std)
            teacher = _TeacherLogits(distiller)
            retrospection_step(distiller.student, teacher, x, criterion, optimizer, options, generator)
            progress(task, epoch * per_epoch + i + 1, epochs * per_epoch)
    distiller.eval()


class _TeacherLogits(torch.nn.Module):
    """The distiller's teacher as SR's synthesis sees it: through its detox masks where a method has them."""

    def __init__(self, distiller: Distiller) -> None:
        super().__init__()
        self.distiller = distiller

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.distiller.teacher_logits(x)
