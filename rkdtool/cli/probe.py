"""`rkdtool probe` (ACC and ASR per probe, Neural Cleanse, the bank) and `rkdtool inspect` (what a
teacher is)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rkdtool.cli.app import app, console, err_console, print_json, progress_bars
from rkdtool.cli.tables import (
    inspect_table,
    probe_tables,
    variance_table,
)
from rkdtool.errors import UsageError


@app.command(
    epilog="Examples: rkdtool probe runs/demo --bank | rkdtool probe demo:badnets --bank --reverse | "
    "rkdtool probe runs/attack-badnets --probe trigger.toml --fail-asr 0.1 --json"
)
def probe(
    model: Annotated[
        str,
        typer.Argument(
            help="A run folder (its student), an attack output folder (its teacher), a weights file, or a "
            "teacher reference (hf:OWNER/REPO[/FILE], file:PATH, demo:KIND)."
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(help="Dataset spec. [default: the model's dataset when known, else digits]"),
    ] = None,
    probe_spec: Annotated[
        list[Path] | None,
        typer.Option("--probe", help="Trigger probe spec (TOML, DESIGN §5); repeatable."),
    ] = None,
    bank: Annotated[
        bool, typer.Option("--bank", help="Add the built-in bank of common triggers (untargeted).")
    ] = False,
    reverse: Annotated[
        bool,
        typer.Option(
            "--reverse",
            help="Reverse-engineer triggers per class (Neural Cleanse): anomaly index, flagged classes, "
            "and their triggers as probes written to --out.",
        ),
    ] = False,
    classes: Annotated[
        int | None,
        typer.Option(
            help="With --reverse: fully optimise only this many candidate classes, chosen by a short "
            "screen of every class (for models with many classes)."
        ),
    ] = None,
    reverse_steps: Annotated[int, typer.Option(help="With --reverse: optimisation steps per class.")] = 150,
    anomaly_scale: Annotated[
        str,
        typer.Option(
            help="With --reverse: MAD of the log mask norms (log) or of the norms (linear, Neural Cleanse's "
            "own; reported either way)."
        ),
    ] = "log",
    anomaly_threshold: Annotated[
        float,
        typer.Option(
            help="With --reverse: flag a class whose anomaly index exceeds this (Neural Cleanse's 2; higher "
            "flags fewer clean classes and fewer weak backdoors)."
        ),
    ] = 2.0,
    features: Annotated[
        bool, typer.Option("--features", help="Also measure feature variance per stage, clean vs triggered.")
    ] = False,
    pgd: Annotated[
        bool,
        typer.Option(
            "--pgd",
            help="Also measure robust accuracy under untargeted PGD-Linf in pixel space (random start).",
        ),
    ] = False,
    pgd_eps: Annotated[
        str, typer.Option(help="PGD L-inf radius in [0, 1] pixel units, a number or a fraction.")
    ] = "8/255",
    pgd_step: Annotated[str, typer.Option(help="PGD step size, a number or a fraction.")] = "2/255",
    pgd_steps: Annotated[int, typer.Option(help="PGD iterations.")] = 20,
    fail_asr: Annotated[
        float | None,
        typer.Option(help="Exit 1 when any probe's ASR exceeds this fraction (a CI gate), e.g. 0.1."),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="Override the architecture inferred from the weights.")
    ] = None,
    trust_pickle: Annotated[
        bool, typer.Option(help="Allow a pickle checkpoint to run code while loading (unsafe).")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Folder for reversed probes. [default: runs/probe-DATE-TIME]")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    download: Annotated[bool, typer.Option(help="Allow downloading the dataset.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (reverse-engineering).")] = 0,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print JSON (DESIGN §5) instead of tables.")
    ] = False,
) -> None:
    """Measure clean accuracy and attack success rate (ASR) per trigger probe.

    ASR counts test images whose true label is not the target; the all-images variant (the RobustKD
    code's) is shown beside it. Bank probes have no target: they report the flip rate to the most
    frequent predicted class, so a backdoor is found without knowing its target.
    """
    from rkdtool.jobs.probe import ProbeConfig, check_gate, run_probe
    from rkdtool.probes.pgd import PgdBudget

    if fail_asr is not None and not 0 <= fail_asr <= 1:
        raise UsageError(f"--fail-asr is a fraction in [0, 1], got {fail_asr}")
    eps, step = pixel_amount(pgd_eps, "--pgd-eps"), pixel_amount(pgd_step, "--pgd-step")
    if pgd and not (0 < eps <= 1 and 0 < step <= 1 and pgd_steps >= 1):
        raise UsageError(
            f"--pgd needs 0 < --pgd-eps <= 1, 0 < --pgd-step <= 1 and --pgd-steps >= 1, got "
            f"{pgd_eps}, {pgd_step}, {pgd_steps}"
        )
    config = ProbeConfig(
        ref=model,
        data=data,
        probes=[str(p) for p in probe_spec or []],
        bank=bank,
        reverse=reverse,
        reverse_classes=classes,
        reverse_steps=reverse_steps,
        anomaly_scale=anomaly_scale,
        anomaly_threshold=anomaly_threshold,
        features=features,
        out=str(out) if out else None,
        arch=arch,
        trust_pickle=trust_pickle,
        device=device,
        download=download,
        seed=seed,
        pgd=PgdBudget(eps, step, pgd_steps) if pgd else None,
    )
    notify = (lambda _msg: None) if json_output else (lambda msg: err_console.print(f"[dim]{msg}[/dim]"))
    with progress_bars(not json_output) as progress:
        report = run_probe(config, progress, notify)
    if json_output:
        print_json(report.to_json())
    else:
        for table in probe_tables(report.to_json()):
            console.print(table)
    check_gate(report, fail_asr)


@app.command("inspect", epilog="Example: rkdtool inspect hf:lixiao985/WideResNet28-4")
def inspect_teacher(
    ref: Annotated[
        str,
        typer.Argument(help="Teacher: hf:OWNER/REPO[@REV][/FILE], file:PATH or a path, or demo:KIND."),
    ],
    arch: Annotated[
        str | None,
        typer.Option(
            help="Load the weights as this architecture (default: inferred); a mismatch is an error."
        ),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow a pickle that needs code to load; that code runs with your privileges (unsafe).",
        ),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
    features: Annotated[
        bool,
        typer.Option(
            "--features",
            help="Add the feature-variance profile per stage on clean test images and, with --probe or "
            "--bank, on triggered ones (the RobustKD paper's Fig. 2).",
        ),
    ] = False,
    data: Annotated[
        str | None, typer.Option(help="With --features: dataset spec. [default: the teacher's, else digits]")
    ] = None,
    probe_spec: Annotated[
        list[Path] | None, typer.Option("--probe", help="With --features: trigger probe spec; repeatable.")
    ] = None,
    bank: Annotated[bool, typer.Option("--bank", help="With --features: the built-in probe bank.")] = False,
) -> None:
    """What a teacher is: file, SHA-256, architecture, classes, parameters, source, normalisation.

    Loads safely (safetensors or weights-only torch.load); reads a Hugging Face repository through the
    local cache when HF_HUB_OFFLINE is set or the Hub is unreachable.
    """
    from rkdtool.teachers import load_model

    with progress_bars(not json_output) as progress:
        loaded = load_model(ref, arch=arch, trust_pickle=trust_pickle, progress=progress)
    info = loaded.summary()
    if features:
        from rkdtool.jobs.probe import feature_profile

        info["feature_variance"] = feature_profile(loaded, data, [str(p) for p in probe_spec or []], bank)
    if json_output:
        print_json(info)
        return
    table = inspect_table(info, ref)
    console.print(table)
    if features:
        console.print(variance_table(info["feature_variance"]))
    if loaded.trusted_pickle:
        console.print(
            "[yellow]warning:[/yellow] this file is a pickle that ran code while loading (--trust-pickle)"
        )


def pixel_amount(text: str, option: str) -> float:
    """Gives back a pixel-unit amount written as a number (0.031) or a fraction (8/255)."""
    numerator, slash, denominator = text.partition("/")
    try:
        value = float(numerator) / (float(denominator) if slash else 1.0)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{option} takes a number or a fraction such as 8/255, got {text!r}") from None
    if value != value:  # nan
        raise UsageError(f"{option} takes a number or a fraction such as 8/255, got {text!r}")
    return value
