"""How the demo teacher's recipe was chosen: a sweep of LBA recipes, each scored on what the demo must show.

For each recipe and seed: the poisoned teacher's ACC and ASR, the clean-teacher control (the trigger on the
clean teacher it started from), a random blend of the same strength on the poisoned teacher, and the ASR of
a plain FKD student distilled on clean data (does the backdoor transfer?).

    python benchmarks/demo_recipe.py [--device cuda] [--seeds 0 1] [--out benchmarks/results/demo_recipe.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace

import torch

from rkdtool.attacks.demo import RECIPES, train_demo_teachers
from rkdtool.attacks.poison import blend_probe
from rkdtool.data import load_dataset
from rkdtool.distill.methods import METHODS, MethodOptions
from rkdtool.distill.trainer import StudentRecipe, evaluate_student, train_student
from rkdtool.models import build_model, parse_arch
from rkdtool.training import resolve_device, seed_everything

VARIANTS = {
    "default": {},
    "steps200": {"trigger_steps": 200},
    "steps400": {"trigger_steps": 400},
    "no-latent": {"latent_weight": 0.0, "poison_epochs": 5},
    "latent0.1": {"latent_weight": 0.1},
    "steps200-no-latent": {"trigger_steps": 200, "latent_weight": 0.0, "poison_epochs": 5},
    "steps300-no-latent": {"trigger_steps": 300, "latent_weight": 0.0, "poison_epochs": 5},
    "steps200-no-latent-poison0.2": {
        "trigger_steps": 200,
        "latent_weight": 0.0,
        "poison_epochs": 5,
        "poison_rate": 0.2,
    },
    "steps400-no-latent": {"trigger_steps": 400, "latent_weight": 0.0, "poison_epochs": 5},
    "wrn16-2": {"arch": "wrn16-2"},
    "wrn16-2-steps200": {"arch": "wrn16-2", "trigger_steps": 200},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--students", nargs="+", default=["wrn10-1"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = load_dataset("digits")
    rows = []
    cleans: dict = {}  # clean teachers by (arch, epochs, seed): variants differ only after it
    print(
        f"{'variant':22} {'seed':>4} {'T acc':>6} {'T asr':>6} {'ctrl':>6} {'rand':>6} "
        f"{'student':>8} {'S acc':>6} {'S asr':>6} {'sec':>6}"
    )
    for name in args.variants:
        for seed in args.seeds:
            began = time.perf_counter()
            recipe = replace(RECIPES["lba"], seed=seed, **VARIANTS[name])
            key = (recipe.arch, recipe.clean_epochs, seed)
            made = train_demo_teachers(recipe, data, device=device, clean=cleans.get(key))
            cleans[key] = made.clean
            probes = [made.probe.bind(data.mean, data.std)]
            noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1000 + seed))
            random_probe = blend_probe("random-blend", noise, recipe.alpha, 0)
            teacher = evaluate_student(made.poisoned, data, probes + [random_probe])
            control = evaluate_student(made.clean, data, probes)
            for student_arch in args.students:
                gen = seed_everything(seed)
                student = build_model(student_arch, 10)
                taps_t, taps_s = parse_arch(recipe.arch).taps, parse_arch(student_arch).taps
                distiller = METHODS["fkd"](
                    student, made.poisoned, taps_s, taps_t, MethodOptions(), data.mean, data.std
                )
                result = train_student(
                    distiller, data, StudentRecipe(epochs=args.epochs), probes, generator=gen, device=device
                )
                row = {
                    "variant": name,
                    "seed": seed,
                    "recipe": asdict(recipe),
                    "student": student_arch,
                    "teacher_acc": teacher["acc"],
                    "teacher_asr": teacher["asr"]["lba-blend"],
                    "control_asr": control["asr"]["lba-blend"],
                    "random_blend_asr": teacher["asr"]["random-blend"],
                    "student_acc": result["acc"],
                    "student_asr": result["asr"]["lba-blend"],
                    "seconds": time.perf_counter() - began,
                }
                rows.append(row)
                print(
                    f"{name:22} {seed:>4} {row['teacher_acc']:6.3f} {row['teacher_asr']:6.3f} "
                    f"{row['control_asr']:6.3f} {row['random_blend_asr']:6.3f} {student_arch:>8} "
                    f"{row['student_acc']:6.3f} {row['student_asr']:6.3f} {row['seconds']:6.1f}",
                    flush=True,
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "machine": platform.node(),
                    "device": str(device),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "rows": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
