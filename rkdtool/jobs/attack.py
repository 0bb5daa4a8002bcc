"""The attack job: `rkdtool attack` from its config to the written teacher folder.

The clean start (`--from-teacher`) may be any teacher reference, a `demo:` one included, so it is loaded here,
above the attack kit, and handed to `attacks.kit.make_attack`.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

from rkdtool.attacks.context import AttackConfig
from rkdtool.attacks.kit import AttackResult, make_attack, write_attack
from rkdtool.errors import UsageError
from rkdtool.models import parse_arch
from rkdtool.teachers import load_teacher_with_arch
from rkdtool.training import ProgressFn, no_progress

DEFAULT_ARCH = "wrn16-1"


def run_attack(config: AttackConfig, progress: ProgressFn = no_progress) -> AttackResult:
    """Gives back the teacher `config` describes, fine-tuned from `config.from_teacher` when it names one.

    An empty `config.arch` means the clean teacher's architecture (else wrn16-1); one that names another
    architecture than the clean teacher's is refused, not loaded into the wrong network."""
    from rkdtool.distill.methods import METHODS

    if not config.shadow_methods or any(m not in METHODS for m in config.shadow_methods):
        raise UsageError(
            f"--shadow-method {','.join(config.shadow_methods)!r}: use distillation methods from "
            f"{', '.join(sorted(METHODS))}, comma-separated"
        )
    if config.shadow_synth_budget is not None and not 0 < config.shadow_synth_budget <= 1:
        raise UsageError(f"--shadow-synth-budget must be in (0, 1], got {config.shadow_synth_budget}")
    distill_student = partial(shadow_student, synth_budget=config.shadow_synth_budget)
    if config.from_teacher is None:
        return make_attack(
            replace(config, arch=config.arch or DEFAULT_ARCH), progress, distill_student=distill_student
        )
    clean, arch = load_teacher_with_arch(config.from_teacher)
    if config.arch and parse_arch(config.arch).name != parse_arch(arch).name:
        raise UsageError(
            f"--arch {config.arch} but --from-teacher {config.from_teacher} is a {arch}; drop --arch (the "
            "clean teacher's architecture is used) or pass the matching one"
        )
    return make_attack(replace(config, arch=arch), progress, clean=clean, distill_student=distill_student)


def shadow_student(
    teacher,
    teacher_arch: str,
    data,
    arch: str,
    seed: int,
    epochs: int,
    method: str = "fkd",
    **settings,
):
    """Gives back a fresh `arch` student distilled from `teacher` on clean images by `method`, as `rkdtool
    distill --method METHOD` prepares and trains it (detox masks and stand-ins included for robustkd-ta), at
    `epochs` epochs: the attack kit's shadow students (attacks/shadow.py). `settings` are DistillConfig
    fields the defender is expected to set (--shadow-synth-budget gives `synth_budget`); None keeps a field's
    default."""
    import torch

    from rkdtool.distill.config import DistillConfig
    from rkdtool.distill.prepare import prepare_method
    from rkdtool.distill.trainer import StudentRecipe, default_channels_last, train_student
    from rkdtool.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_model(arch, data.num_classes)
    device = next(teacher.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    chosen = {key: value for key, value in settings.items() if value is not None}
    config = DistillConfig(**{**chosen, "method": method, "seed": seed})
    distiller, _, _ = prepare_method(
        method, student, teacher, teacher_arch, arch, data, [], config, generator=generator, device=device
    )
    recipe = StudentRecipe(epochs=epochs, eval_every=epochs, channels_last=default_channels_last(device))
    train_student(distiller, data, recipe, [], generator=generator, device=device)
    return student


def run_and_write_attack(config: AttackConfig, out: Path, progress: ProgressFn = no_progress) -> dict:
    """Trains the attack and writes its folder; gives back the `attack --json` summary."""
    return write_attack(run_attack(config, progress), out)
