"""`rkdtool distill`: the main job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rkdtool.cli.app import app, console, print_json, progress_bars
from rkdtool.cli.tables import (
    distill_table,
)


@app.command(
    epilog="Examples: rkdtool distill (the embedded demo) | "
    "rkdtool distill --teacher hf:lixiao985/WideResNet28-4 --student wrn16-2 --data cifar100:data/"
)
def distill(
    teacher: Annotated[
        str,
        typer.Option(
            help="Teacher: hf:OWNER/REPO[@REV][/FILE], file:PATH or a path (an attack folder too), or "
            "demo:ckd|lba|badnets."
        ),
    ] = "demo:ckd",
    student: Annotated[
        str | None,
        typer.Option(
            help="Student architecture (see `rkdtool models`). [default: wrn10-1 for demo "
            "teachers, else wrn16-2]"
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Dataset spec: digits, cifar10[:ROOT], cifar100[:ROOT], gtsrb[:ROOT], "
            "imagefolder:PATH. [default: the teacher's dataset when known, else digits]"
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="robustkd-ta (trigger-aware RobustKD: + consistency on synthesised triggers; the measured "
            "winner), robustkd (the paper, reconstructed), fkd, kd, abd (KD re-weighted by ABD's Shuffling "
            "Vaccine, then Self-Retrospection) or kdiga (KD + input-gradient alignment: adversarial "
            "robustness, not backdoors). [default: robustkd-ta; abd with --data-free]"
        ),
    ] = None,
    data_free: Annotated[
        bool,
        typer.Option(
            "--data-free",
            help="Distill without training images (ZSKT: a generator's images; the test split only "
            "measures): --method abd adds ABD's vaccine and Self-Retrospection, --method kd is plain ZSKT.",
        ),
    ] = False,
    abd_sr: Annotated[
        bool | None,
        typer.Option(
            "--abd-sr/--no-abd-sr",
            help="ABD's Self-Retrospection after training (unlearns a synthesised universal perturbation), "
            "for any method. [default: on for abd]",
        ),
    ] = None,
    abd_sv: Annotated[
        bool,
        typer.Option(
            "--abd-sv",
            help="ABD's Shuffling Vaccine on fkd, robustkd or robustkd-ta: images on which shuffled teacher "
            "copies still agree with the teacher are unlearnt (-0.1 x their feature loss), the rest learnt.",
        ),
    ] = False,
    baseline: Annotated[
        bool,
        typer.Option(help="Also train a plain FKD student (plain ZSKT with --data-free) for comparison."),
    ] = True,
    probe: Annotated[
        list[Path] | None,
        typer.Option(help="Trigger probe spec (TOML); repeatable. Demo teachers bring theirs."),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            help="Student epochs (with --data-free: chunks of 60 generator rounds on digits, 400 elsewhere). "
            "[default: 10 on digits, else 200]"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Initial learning rate (x0.1 at 50%, x0.01 at 75%).")] = 0.1,
    clean_fraction: Annotated[
        float, typer.Option(help="Share of the clean training data the defender has (0, 1].")
    ] = 1.0,
    tau: Annotated[
        float, typer.Option(help="RobustKD mask threshold: 0 <= M <= tau (paper's best 0.1).")
    ] = 0.1,
    detox_epochs: Annotated[
        int | None, typer.Option(help="Mask-fitting epochs. [default: 5 on digits, else 40 (paper)]")
    ] = None,
    detox_form: Annotated[
        str, typer.Option(help="eq7: (1-M)F + MP (paper); eq15: F + MP (ablation).")
    ] = "eq7",
    detox_stages: Annotated[str, typer.Option(help="Stages to detoxify: all, last or last2.")] = "all",
    detox_loss: Annotated[
        str,
        typer.Option(
            help="Mask-fitting loss terms joined by +: var, ce (var+ce is the paper's), inv (trigger-aware: "
            "the change synthesised triggers make, e.g. inv+ce)."
        ),
    ] = "var+ce",
    detox_lr: Annotated[float, typer.Option(help="Adam lr of the detox masks (paper: 1e-3).")] = 1e-3,
    tau_search: Annotated[
        bool,
        typer.Option(
            help="Choose tau by Algorithm 1 (grid 0.05-0.6, proxy students, scored with synthesised triggers "
            "on held-out training images; the given probes never choose)."
        ),
    ] = False,
    teacher_bn: Annotated[
        str,
        typer.Option(help="Teacher BN during distillation: eval (deterministic) or train (reference code)."),
    ] = "eval",
    student_noise: Annotated[
        float,
        typer.Option(help="Salt-and-pepper share on the RobustKD student's input (reference code: 0.1)."),
    ] = 0.1,
    synth_budget: Annotated[
        float, typer.Option(help="Radius (L-inf) / alpha (blend) of the synthesised perturbations.")
    ] = 0.2,
    synth_pool: Annotated[
        str,
        typer.Option(
            help="robustkd-ta's trigger stand-ins, joined by +: uap (synthesised from the teacher), bank "
            "(the built-in common triggers), noise (random noise: the control without synthesis)."
        ),
    ] = "uap",
    synth_refresh: Annotated[
        int,
        typer.Option(help="robustkd-ta: every N epochs also synthesise a perturbation against the student."),
    ] = 0,
    refresh_kind: Annotated[
        str,
        typer.Option(
            help="The refreshed perturbation: linf1 (grey L-inf), linf3 (per-channel L-inf) or blend1 (a "
            "learnable blend)."
        ),
    ] = "linf1",
    refresh_budget: Annotated[
        float | None,
        typer.Option(help="Radius / alpha of the refreshed perturbation. [default: --synth-budget]"),
    ] = None,
    iga_lambda: Annotated[
        float | None,
        typer.Option(
            help="Input-gradient alignment weight (KDIGA), added to any method: the student's pixel-space "
            "input gradients follow the teacher's. [default: 1 for --method kdiga, else 0]"
        ),
    ] = None,
    pgd: Annotated[
        bool,
        typer.Option(
            "--pgd",
            help="Also measure the teacher's and students' robust accuracy (PGD-Linf 8/255, step 2/255, "
            "20 steps; `rkdtool probe RUN --pgd` for another budget).",
        ),
    ] = False,
    eval_every: Annotated[
        int, typer.Option(help="Evaluate the students' ACC/ASR every N epochs (and after the last).")
    ] = 1,
    amp: Annotated[
        bool,
        typer.Option(
            help="Mixed precision: bf16 autocast on CPU; on CUDA bf16 where supported, else fp16 with a "
            "GradScaler. Off by default (benchmarks/throughput.py measures it on the machine at hand)."
        ),
    ] = False,
    channels_last: Annotated[
        bool | None,
        typer.Option(
            "--channels-last/--no-channels-last",
            help="NHWC memory format for teacher, student and batches while the student trains. "
            "[default: on for the CPU, where benchmarks/throughput.py measured it faster; off on CUDA]",
        ),
    ] = None,
    teacher_arch: Annotated[
        str | None, typer.Option(help="Override the architecture inferred from the teacher's weights.")
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow a teacher pickle to run code while loading (unsafe; recorded in the report)."
        ),
    ] = False,
    download: Annotated[bool, typer.Option(help="Allow downloading the dataset.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder. [default: runs/distill-DATE-TIME]")] = None,
    resume: Annotated[bool, typer.Option(help="Resume an interrupted run of the same --out.")] = False,
    train_subset: Annotated[
        int | None, typer.Option(help="Use only this many training images (quick checks).", hidden=True)
    ] = None,
    test_subset: Annotated[
        int | None, typer.Option(help="Use only this many test images.", hidden=True)
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print report.json instead of the table.")
    ] = False,
) -> None:
    """Distill a robust student from a (possibly backdoored) teacher and measure ACC/ASR on trigger probes.

    With no arguments it runs the embedded demo: a CKD-backdoored WRN-16-1 on scikit-learn's digits
    (shipped with the package, with the clean teacher it came from), an FKD baseline student and a
    trigger-aware RobustKD student (robustkd-ta; --method robustkd runs the paper's method as
    reconstructed).
    """
    from rkdtool.distill.config import DistillConfig
    from rkdtool.distill.job import run_distill
    from rkdtool.ranks import Ranks

    config = DistillConfig(
        teacher=teacher,
        student=student,
        data=data,
        method=method or ("abd" if data_free else "robustkd-ta"),
        data_free=data_free,
        abd_sr=abd_sr,
        abd_sv=abd_sv,
        baseline=baseline,
        probes=[str(p) for p in probe or []],
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        clean_fraction=clean_fraction,
        device=device,
        seed=seed,
        out=str(out) if out else None,
        resume=resume,
        tau=tau,
        detox_epochs=detox_epochs,
        detox_form=detox_form,
        detox_stages=detox_stages,
        detox_loss=detox_loss,
        detox_lr=detox_lr,
        tau_search=tau_search,
        teacher_bn=teacher_bn,
        student_noise=student_noise,
        synth_budget=synth_budget,
        synth_pool=synth_pool,
        synth_refresh=synth_refresh,
        refresh_kind=refresh_kind,
        refresh_budget=refresh_budget,
        iga_lambda=iga_lambda,
        pgd=pgd,
        eval_every=eval_every,
        amp=amp,
        channels_last=channels_last,
        teacher_arch=teacher_arch,
        trust_pickle=trust_pickle,
        download=download,
        train_subset=train_subset,
        test_subset=test_subset,
    )
    main = Ranks.from_env().main  # under torchrun only rank 0 shows progress and prints
    with progress_bars(main and not json_output) as progress:
        run_dir, report = run_distill(config, progress)
    if not main:
        return
    if json_output:
        print_json(report)
        return
    console.print(distill_table(report))
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"run folder: {run_dir}  (next: rkdtool export {run_dir} --target jetson)")
