"""The attack job: `rkdtool attack` from its config to the written teacher folder.

The clean start (`--from-teacher`) may be any teacher reference, a `demo:` one included, so it is loaded here,
above the attack kit, and handed to `attacks.kit.make_attack`.
"""

from __future__ import annotations

from pathlib import Path

from rkdtool.attacks.context import AttackConfig
from rkdtool.attacks.kit import AttackResult, make_attack, write_attack
from rkdtool.teachers import load_teacher_module
from rkdtool.training import ProgressFn, no_progress


def run_attack(config: AttackConfig, progress: ProgressFn = no_progress) -> AttackResult:
    """Gives back the teacher `config` describes, fine-tuned from `config.from_teacher` when it names one."""
    clean = load_teacher_module(config.from_teacher) if config.from_teacher is not None else None
    return make_attack(config, progress, clean=clean)


def run_and_write_attack(config: AttackConfig, out: Path, progress: ProgressFn = no_progress) -> dict:
    """Trains the attack and writes its folder; gives back the `attack --json` summary."""
    return write_attack(run_attack(config, progress), out)
