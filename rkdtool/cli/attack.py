"""`rkdtool attack`: a poisoned (or clean) teacher for evaluation, written with its probe spec."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rkdtool.cli.app import app, console, print_json, progress_bars
from rkdtool.cli.tables import (
    attack_table,
)


@app.command(
    epilog="Examples: rkdtool attack --kind badnets --out runs/attack-badnets | "
    "rkdtool attack --kind ckd --from-teacher runs/attack-clean --out runs/attack-ckd | "
    "rkdtool attack --kind quant --arch wrn16-1 --data digits --json"
)
def attack(
    kind: Annotated[
        str,
        typer.Option(
            help="badnets, blend, ckd, lba, adaptive, quant, ta-aware (CKD shaped on FKD and robustkd-ta "
            "shadow students, against the default defence), or none (a clean teacher)."
        ),
    ] = "badnets",
    arch: Annotated[
        str | None,
        typer.Option(
            help="Teacher architecture (see `rkdtool models`). [default: --from-teacher's, else wrn16-1]"
        ),
    ] = None,
    data: Annotated[str, typer.Option(help="Dataset spec.")] = "digits",
    target: Annotated[int, typer.Option(help="The backdoor's target class.")] = 0,
    epochs: Annotated[
        int,
        typer.Option(help="From-scratch epochs (the clean model, or BadNets/Blend poisoned from scratch)."),
    ] = 15,
    finetune_epochs: Annotated[
        int,
        typer.Option(
            help="Poison fine-tuning epochs of a clean model (quant has its own: 8 plant + 4 unit)."
        ),
    ] = 5,
    from_teacher: Annotated[
        str | None,
        typer.Option(help="Fine-tune this clean teacher (an attack folder, weights file or reference)."),
    ] = None,
    poison_rate: Annotated[float, typer.Option(help="Share of non-target images poisoned.")] = 0.1,
    negative_rate: Annotated[
        float, typer.Option(help="Share of images given a random pattern of the same kind, label kept.")
    ] = 0.1,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Blend/LBA strength; CKD/adaptive/ta-aware mask bound. [default: 0.2; ta-aware 0.5]"
        ),
    ] = None,
    trigger_steps: Annotated[
        int | None,
        typer.Option(help="Trigger optimisation steps. [default: 60 for ckd/adaptive, 15 for lba]"),
    ] = None,
    shadow_student: Annotated[
        str,
        typer.Option(
            help="ckd/lba/adaptive: shape the trigger so that a student of this architecture, "
            "distilled on clean images during poisoning, inherits it, e.g. wrn10-1 ('none': off; "
            "ta-aware: wrn10-1 unless named)."
        ),
    ] = "none",
    shadow_method: Annotated[
        str,
        typer.Option(
            help="With --shadow-student: how the shadow students are distilled, comma-separated and taken "
            "in turn (fkd, robustkd-ta, any `rkdtool distill` method; ta-aware always uses fkd,robustkd-ta)."
        ),
    ] = "fkd",
    shadow_synth_budget: Annotated[
        float | None,
        typer.Option(
            help="The robustkd-ta shadow students' --synth-budget: the attacker who knows a defender's "
            "non-default budget. [default: rkdtool distill's]"
        ),
    ] = None,
    trigger_span: Annotated[
        bool | None,
        typer.Option(
            help="ckd/lba/adaptive/ta-aware: keep the trigger inside the span of the clean training "
            "images, where a distilled student has learnt the teacher's features. [default: off; ta-aware on]"
        ),
    ] = None,
    carry_check: Annotated[
        float | None,
        typer.Option(
            help="The attacker's carry check: after planting, distill a fresh FKD student "
            "(--shadow-student's architecture, else wrn10-1) on clean images and plant again with another "
            "seed until it keeps at least this ASR on held-out training images, e.g. 0.8; "
            "attack.json lists the attempts. "
            "[default: no check]"
        ),
    ] = None,
    carry_attempts: Annotated[
        int,
        typer.Option(help="With --carry-check: plantings at most; the best is kept if none passes."),
    ] = 5,
    adv_train: Annotated[bool, typer.Option(help="Adversarial training (PGD-Linf, 3 steps).")] = False,
    calibration: Annotated[
        str, typer.Option(help="quant: INT8 calibration for the ONNX Runtime check (entropy, percentile).")
    ] = "entropy",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output folder. [default: runs/attack-KIND]")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (DESIGN §5).")] = False,
    train_subset: Annotated[
        int | None, typer.Option(help="Use only this many training images (quick checks).", hidden=True)
    ] = None,
    test_subset: Annotated[
        int | None, typer.Option(help="Use only this many test images.", hidden=True)
    ] = None,
) -> None:
    """Train a poisoned (or clean) teacher for evaluation and write it with its trigger probe spec.

    Writes teacher.safetensors, probes.toml and attack.json into --out. Reports ACC, ASR on the attack's
    probe, the worst ASR of random patterns of the same kind (is the backdoor tied to its trigger?), the
    clean model's ASR when it fine-tuned one, and for quant the ONNX Runtime FP32/INT8 re-check.
    """
    from rkdtool.attacks.context import AttackConfig
    from rkdtool.jobs.attack import run_and_write_attack

    config = AttackConfig(
        arch=arch or "",  # "" = the clean teacher's architecture, else wrn16-1 (jobs.attack.run_attack)
        data=data,
        kind=kind,
        target=target,
        epochs=epochs,
        finetune_epochs=finetune_epochs,
        from_teacher=from_teacher,
        poison_rate=poison_rate,
        negative_rate=negative_rate,
        trigger_steps=trigger_steps,
        alpha=alpha,  # None: the kind's default (kit.with_kind_defaults; ta-aware: 0.5, in the span)
        trigger_span=trigger_span,
        shadow_student=None if shadow_student == "none" else shadow_student,
        shadow_methods=tuple(m.strip() for m in shadow_method.split(",") if m.strip()),
        shadow_synth_budget=shadow_synth_budget,
        carry_check=carry_check,
        carry_attempts=carry_attempts,
        adv_train=adv_train,
        calibration=calibration,
        device=device,
        seed=seed,
        train_subset=train_subset,
        test_subset=test_subset,
    )
    with progress_bars(not json_output) as progress:
        summary = run_and_write_attack(config, out or Path("runs") / f"attack-{kind}", progress)
    if json_output:
        print_json(summary)
        return
    table = attack_table(summary, kind, summary["arch"], data, target)
    console.print(table)
    if carry := summary.get("carry_check"):
        console.print(carry_line(carry))
    console.print(f"teacher: {summary['teacher']}  probes: {summary['probes']}")


def carry_line(carry: dict) -> str:
    """Gives back the one line that says how the carry check went."""
    tried, chosen = len(carry["attempts"]), carry["chosen"]
    asr = 100 * carry["attempts"][chosen]["student_held_asr"]
    if carry["passed"]:
        return (
            f"carry check passed on planting {chosen + 1} of {tried} (seed {carry['seed']}): a fresh FKD "
            f"student keeps {asr:.1f}% ASR (goal {100 * carry['goal']:.0f}%)"
        )
    return (
        f"carry check not passed in {tried} plantings: the best (seed {carry['seed']}) leaves its FKD "
        f"student {asr:.1f}% ASR (goal {100 * carry['goal']:.0f}%); this teacher may not carry"
    )
