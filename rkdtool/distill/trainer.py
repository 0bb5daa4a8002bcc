"""The distillation loop shared by every method: SGD recipe, per-epoch evaluation, checkpoints."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rkdtool.data import ImageData, augment
from rkdtool.distill.methods import Distiller
from rkdtool.probes.metrics import accuracy, probe_results
from rkdtool.probes.spec import Probe
from rkdtool.training import ProgressFn, batches, no_progress, set_lr, sgd, step_lr, steps_per_epoch
from rkdtool.weights import atomic_path


@dataclass
class StudentRecipe:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4


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
) -> dict:
    """Gives back the final evaluation of the distilled student (trained in place), with timings.

    With `checkpoint`, the state after each epoch is written there (atomically) and an existing one is
    resumed from; it holds only tensors and numbers, so it loads with `torch.load(weights_only=True)`.
    One function (about 85 lines) because it is the epoch loop itself: resume, train, evaluate, checkpoint.
    """
    distiller.to(device)
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
            start_epoch = int(state["epoch"]) + 1
    per_epoch = steps_per_epoch(len(data.train_labels), recipe.batch_size)
    total = recipe.epochs * per_epoch
    seconds = []
    for epoch in range(start_epoch, recipe.epochs):
        began = time.perf_counter()
        set_lr(optimizer, step_lr(recipe.lr, epoch, recipe.epochs))
        distiller.eval()
        distiller.before_epoch(epoch, data, generator, device)
        distiller.train()
        sums: dict[str, torch.Tensor] = {}
        for i, (images, labels) in enumerate(
            batches(data.train_images, data.train_labels, recipe.batch_size, generator)
        ):
            images = augment(images, data.augmentation, generator).to(device)
            labels = labels.to(device)
            _, losses = distiller.step(images, labels, generator)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in losses.items():  # accumulate on device; read once per epoch
                sums[name] = sums.get(name, 0) + value.detach()
            progress(task, epoch * per_epoch + i + 1, total)
        seconds.append(time.perf_counter() - began)
        distiller.eval()
        result = evaluate_student(distiller.student, data, probes)
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
                },
                tmp,
            )
            os.replace(tmp, checkpoint)
    distiller.eval()
    final = evaluate_student(distiller.student, data, probes)
    final["epochs"] = recipe.epochs
    final["seconds_per_epoch"] = sum(seconds) / len(seconds) if seconds else None
    return final
