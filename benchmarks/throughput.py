"""Distillation steps per second: rkdtool's trainer against a re-implementation of the reference loop, and
the trainer's own switches, side by side in one run (issue 14 item 4).

    .venv/bin/python benchmarks/throughput.py [--teacher wrn16-1] [--student wrn10-1] [--batch 64]
        [--steps 20] [--rounds 5] [--device cpu] [--out benchmarks/results/throughput.md]

Every variant runs the same models on digits; one measurement is `--steps` optimisation steps (data
order, augmentation, noise, forward, backward, SGD), and the rounds alternate the variants so that a
machine's drift falls on all of them alike. Reported: the median steps/s of each variant and the ratios
that matter:
- `reference` is the RobustKD/overhaul code's distillation step written afresh (no code copied), as
  `ReferenceLoop` describes: a torchvision pipeline on one PIL image at a time, salt-and-pepper noise one
  image at a time, the teacher in train mode and outside `no_grad`, FKD's loss as its `distiller.py`
  writes it, NCHW, FP32. `rkdtool fkd+noise` does the same work with the trainer's code and its defaults
  on the device (`trainer.train_step`, `data.augment` and `data.salt_and_pepper` on whole batches, the
  teacher frozen and in eval mode, FKD's fused partial L2, and on the CPU channels_last); the `NCHW` row
  is the trainer with the layout the device does not default to, so that the layout's share shows;
- `robustkd-ta` against `fkd+noise` (the default method doubles the student's batch: 2x is the arithmetic);
- `--amp` against plain `fkd`, and channels_last against NCHW.
Models are untrained (step cost does not depend on the weights); robustkd-ta's stand-ins are the built-in
probe bank and its detox masks are fitted for one epoch, so no synthesis is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rkdtool.data import load_dataset, normalize
from rkdtool.distill.config import DistillConfig
from rkdtool.distill.prepare import prepare_method
from rkdtool.distill.trainer import (
    StudentRecipe,
    amp_dtype,
    default_channels_last,
    train_step,
    training_split,
)
from rkdtool.machine import cpu_flags, cpu_name
from rkdtool.models import FeatureTaps, build_model
from rkdtool.ranks import Ranks, wrap_learner
from rkdtool.training import batches, resolve_device, sgd

RESULTS = Path(__file__).resolve().parent / "results"
KERNEL_VARS = ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def reference_transform(kind: str):
    """The reference code's per-image torchvision pipeline on a PIL image: digits' translate recipe (pad 2,
    black fill, random 32 crop) or CIFAR's (reflect-pad 4, flip, random 32 crop), then ToTensor."""
    from torchvision import transforms

    if kind == "cifar":
        steps = [transforms.Pad(4, padding_mode="reflect"), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Pad(2)]
    return transforms.Compose([*steps, transforms.RandomCrop(32), transforms.ToTensor()])


def reference_salt(image: torch.Tensor, rng: np.random.Generator, p: float = 0.1) -> torch.Tensor:
    """One image's salt-and-pepper noise drawn in numpy (the reference code's per-image `torch_add_salt`)."""
    draw = rng.random(image.shape[-2:])
    out = image.clone()
    out[:, torch.from_numpy(draw < p / 2)] = 1.0
    out[:, torch.from_numpy((draw >= p / 2) & (draw < p))] = 0.0
    return out


def reference_fkd_loss(student_feats, teacher_feats, margins) -> torch.Tensor:
    """FKD's loss as the reference `distiller.py` writes it: the target raised to the margin, an unreduced
    MSE, the mask as a float product, a sum per layer weighted 2^-(n-k-1); then / B / 1000 as its
    training script does. The same value as rkdtool's `fkd_loss`, through autograd's graph of it."""
    n, total = len(student_feats), 0
    for k, (s, t, m) in enumerate(zip(student_feats, teacher_feats, margins, strict=True)):
        target = torch.max(t, m)
        terms = nn.functional.mse_loss(s, target, reduction="none")
        total = total + (terms * ((s > target) | (target > 0)).float()).sum() / 2 ** (n - k - 1)
    return total / student_feats[0].shape[0] / 1000


class ReferenceLoop:
    """The reference distillation step (clovaai/overhaul-distillation `train_with_distillation.py` and
    `distiller.py`, RobustKD's copy with its noise): a dataset of uint8 images that hands out one PIL image
    at a time through the torchvision pipeline (the DataLoader's workers run in this process: the machine
    has no cores to spare), per-image noise, `d_net.train()` putting the teacher in train mode, and the
    teacher's forward outside `no_grad` with its parameters still requiring gradients (the reference never
    freezes it; its features are detached only in the loss). FP32, NCHW."""

    def __init__(self, distiller, data, device, batch: int, seed: int = 0):
        from PIL import Image

        self.d, self.data, self.device, self.batch = distiller, data, device, batch
        for p in distiller.teacher.parameters():
            p.requires_grad_(True)
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)  # RandomCrop draws from the global generator, as in the reference
        self.pil = Image.fromarray
        self.uint8 = (data.train_images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.transform = reference_transform(data.augmentation)
        self.optimizer = sgd(distiller.learnable_parameters(), 0.1, 5e-4)
        self.order = self._batches()

    def _batches(self):
        while True:
            order = self.rng.permutation(len(self.uint8))
            for start in range(0, len(order) - self.batch + 1, self.batch):
                yield order[start : start + self.batch]

    def _image(self, index: int) -> torch.Tensor:
        return self.transform(self.pil(self.uint8[index]))

    def step(self) -> None:
        d, mean, std = self.d, self.data.mean, self.data.std
        indices = next(self.order)
        clean = torch.stack([self._image(i) for i in indices])
        labels = self.data.train_labels[torch.from_numpy(indices)]
        noisy = torch.stack([reference_salt(x, self.rng) for x in clean])
        clean, noisy, labels = clean.to(self.device), noisy.to(self.device), labels.to(self.device)
        d.student.train()
        d.teacher.train()
        with FeatureTaps(d.teacher, d.teacher_taps) as tapper:
            _, teacher_feats = tapper.run(normalize(clean, mean, std))
        with FeatureTaps(d.student, d.student_taps) as tapper:
            logits, student_feats = tapper.run(normalize(noisy, mean, std))
        projected = [c(f) for c, f in zip(d.connectors, student_feats, strict=True)]
        teacher_feats = [t.detach() for t in teacher_feats]
        loss = nn.functional.cross_entropy(logits, labels) + reference_fkd_loss(
            projected, teacher_feats, d.margins
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class TrainerLoop:
    """rkdtool's step as `trainer.train_student` runs it: the training split on the device where it fits
    (`trainer.training_split`), batched augmentation on whole tensors there, then `train_step` (the
    trainer's own function) with the method's distiller; under torchrun (`ranks`) every rank draws the
    same global batch of `batch` x world images and steps on its shard through DDP, as the trainer does."""

    def __init__(
        self, distiller, data, device, batch: int, *, amp=False, channels_last=None, ranks: Ranks = Ranks()
    ):
        self.d, self.data, self.device, self.ranks = distiller, data, device, ranks
        self.batch = batch * ranks.world  # the global batch; each rank steps on its shard of `batch`
        self.images, self.labels = training_split(data, device, StudentRecipe().device_data_limit_mb)
        self.generator = torch.Generator().manual_seed(0)
        self.dtype = amp_dtype(device, amp)
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        if channels_last is None:  # the trainer's own default on this device
            channels_last = default_channels_last(device)
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        distiller.to(device, memory_format=self.layout)
        self.learner = wrap_learner(distiller, ranks, device)
        self.optimizer = sgd(distiller.learnable_parameters(), 0.1, 5e-4)
        self.order = self._batches()

    def _batches(self):
        while True:
            yield from batches(self.images, self.labels, self.batch, self.generator)

    def step(self) -> None:
        from rkdtool.data import augment

        images, labels = next(self.order)
        images = augment(images, self.data.augmentation, self.generator)
        images = self.ranks.shard(images).to(self.device, memory_format=self.layout)
        self.d.train()
        train_step(
            self.learner,
            self.optimizer,
            images,
            self.ranks.shard(labels).to(self.device),
            self.generator,
            dtype=self.dtype,
            scaler=self.scaler,
        )


def distiller_for(method: str, args, data, device, *, noise: float = 0.0):
    config = DistillConfig(method=method, synth_pool="bank", detox_epochs=1, student_noise=noise)
    teacher = build_model(args.teacher, data.num_classes).to(device).eval()
    student = build_model(args.student, data.num_classes)
    distiller, _, _ = prepare_method(
        method,
        student,
        teacher,
        args.teacher,
        args.student,
        data,
        [],
        config,
        generator=torch.Generator().manual_seed(0),
        device=device,
    )
    distiller.options.student_noise = noise
    return distiller.to(device)


def steps_per_second(loop, steps: int) -> float:
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loop.step()
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="wrn16-1")
    parser.add_argument("--student", default="wrn10-1")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput.md")
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_dataset("digits")
    torch.manual_seed(0)
    layout = "channels_last" if default_channels_last(device) else "NCHW"
    other = "NCHW" if default_channels_last(device) else "channels_last"

    def trainer(method: str, noise: float = 0.0, **switches) -> TrainerLoop:
        return TrainerLoop(
            distiller_for(method, args, data, device, noise=noise), data, device, args.batch, **switches
        )

    loops = {
        "reference (fkd+noise)": ReferenceLoop(
            distiller_for("fkd", args, data, device), data, device, args.batch
        ),
        "rkdtool fkd+noise": trainer("fkd", 0.1),
        f"rkdtool fkd+noise, {other}": trainer("fkd", 0.1, channels_last=other == "channels_last"),
        "rkdtool fkd": trainer("fkd"),
        "rkdtool robustkd-ta": trainer("robustkd-ta", 0.1),
        "rkdtool fkd --amp": trainer("fkd", amp=True),
    }
    for loop in loops.values():  # warm-up: allocator, oneDNN primitive caches
        steps_per_second(loop, 3)
    samples: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.rounds):
        for name, loop in loops.items():
            samples[name].append(steps_per_second(loop, args.steps))
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in samples.items()),
            flush=True,
        )
    median = {name: statistics.median(v) for name, v in samples.items()}
    nhwc = "rkdtool fkd+noise" if layout == "channels_last" else f"rkdtool fkd+noise, {other}"
    nchw = f"rkdtool fkd+noise, {other}" if layout == "channels_last" else "rkdtool fkd+noise"
    ratios = {
        "rkdtool fkd+noise / reference": median["rkdtool fkd+noise"] / median["reference (fkd+noise)"],
        "rkdtool fkd+noise in NCHW / reference": median[nchw] / median["reference (fkd+noise)"],
        "robustkd-ta step time / fkd+noise step time": median["rkdtool fkd+noise"]
        / median["rkdtool robustkd-ta"],
        "--amp / fp32 (steps/s)": median["rkdtool fkd --amp"] / median["rkdtool fkd"],
        "channels_last / NCHW (steps/s)": median[nhwc] / median[nchw],
    }
    flags = set(cpu_flags())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "below AVX2"
    extras = [f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]
    held = [f"{k}={os.environ[k]}" for k in KERNEL_VARS if os.environ.get(k)]
    kernels = "held: " + " ".join(held) if held else "this CPU's default"
    machine = (
        f"{cpu_name()} ({isa}{', ' + ', '.join(extras) if extras else ', no bf16/AMX units'}), "
        f"{torch.get_num_threads()} torch threads, device {device}, torch {torch.__version__}, "
        f"kernels {kernels}"
    )
    command = (
        f"python benchmarks/throughput.py --teacher {args.teacher} --student {args.student} "
        f"--batch {args.batch} --steps {args.steps} --rounds {args.rounds} --device {args.device}"
    )
    lines = [
        "# Distillation throughput: rkdtool's trainer, the reference loop, and the trainer's switches",
        "",
        f"Machine: {machine}. {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        f"Command: `{command}`. Teacher {args.teacher}, student {args.student}, digits, batch {args.batch}; "
        f"median of {args.rounds} alternating rounds of {args.steps} steps each.",
        "",
        "| variant | steps/s (median) | min | max |",
        "|---|---|---|---|",
        *(f"| {n} | {median[n]:.2f} | {min(v):.2f} | {max(v):.2f} |" for n, v in samples.items()),
        "",
        "| ratio | value |",
        "|---|---|",
        *(f"| {k} | {v:.2f}x |" for k, v in ratios.items()),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raw = {"machine": machine, "command": command, "samples": samples, "median": median, "ratios": ratios}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    main()
