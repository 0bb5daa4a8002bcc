"""Efficacy of the defences: each attack of the kit x each distillation variant, on `digits`, several seeds.

    python benchmarks/efficacy.py                                # the full table and the ablations
    python benchmarks/efficacy.py --attacks lba --seeds 0 --no-ablations   # a reduced budget, stated
    python benchmarks/efficacy.py --attacks ckd adaptive --no-ablations --merge   # rerun some attacks' rows

Teachers: one clean WRN-16-1 (`rkdtool attack --kind none`), BadNets and Blend poisoned from scratch, and
LBA, CKD and the adaptive attacker fine-tuned from that clean teacher, all with the attack kit's defaults.
They are trained once into --teachers (reused when present; delete the folder to retrain). With
--adv-teachers every teacher, the clean one too, is adversarially trained (`rkdtool attack --adv-train`:
PGD-Linf 8/255, 3 steps) into its own folder, every variant runs every seed whatever FKD carries, and
`--attacks none` measures students of the clean teacher: the setting of KDIGA, whose point is the teacher's
robust accuracy (`--pgd-eps`) carried into the student.

For every attack: the teacher's ACC and ASR on its own probe, the same probe on the clean teacher (control),
and whether plain FKD carries the backdoor (FKD student ASR >= 50%). For every variant (the code the main
job runs, `rkdtool.distill.job.prepare_method`): student ACC and ASR, mean and spread over the seeds, seconds
per epoch and the one-time cost (trigger synthesis, mask fitting, tau search). Defences only use what a
defender has: the teacher and clean training data (and the built-in probe bank where a variant says so); the
attack's true trigger is used for reporting only. Writes benchmarks/results/efficacy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from rkdtool.attacks.context import AttackConfig
from rkdtool.attacks.kit import write_attack
from rkdtool.data import load_dataset
from rkdtool.distill.config import DistillConfig, retrospects
from rkdtool.distill.datafree import prepare_data_free, retrospection_length, train_data_free
from rkdtool.distill.prepare import prepare_method
from rkdtool.distill.trainer import StudentRecipe, evaluate_student, retrospect, train_student
from rkdtool.jobs.attack import run_attack
from rkdtool.machine import cpu_flags, cpu_name, numerics_environment
from rkdtool.models import build_model
from rkdtool.probes.pgd import PgdBudget, robust_accuracy
from rkdtool.probes.spec import load_probes
from rkdtool.training import resolve_device, seed_everything
from rkdtool.weights import build_from_weights

RESULTS = Path(__file__).resolve().parent / "results"

# name -> (method, DistillConfig overrides). The faithful method keeps its name; the others are labelled.
VARIANTS: dict[str, tuple[str, dict]] = {
    "fkd": ("fkd", {}),
    "robustkd": ("robustkd", {}),
    "robustkd-tau-search": ("robustkd", {"tau_search": True}),
    "robustkd-ta": ("robustkd-ta", {}),
    "robustkd-ta (noise control)": ("robustkd-ta", {"synth_pool": "noise"}),
    "robustkd-ta+tam": ("robustkd-ta", {"detox_loss": "inv+ce", "tau": 0.2, "detox_lr": 0.05}),
    "robustkd-ta+refresh": ("robustkd-ta", {"synth_refresh": 1}),
    # a blend at the ta-aware attacker's alpha, synthesised against the student every epoch (issue 13)
    "robustkd-ta+blend-refresh": (
        "robustkd-ta",
        {"synth_refresh": 1, "refresh_kind": "blend1", "refresh_budget": 0.5},
    ),
    "robustkd-ta+bank": ("robustkd-ta", {"synth_pool": "uap+bank"}),
    "robustkd-ta+bank+refresh": ("robustkd-ta", {"synth_pool": "uap+bank", "synth_refresh": 1}),
    # The other published defences (issue 12), named as efficacy.json's `method` keeps them comparable:
    "abd": ("abd", {}),  # data-driven: KD re-weighted by the Shuffling Vaccine, then Self-Retrospection
    "zskt": ("kd", {"data_free": True}),  # data-free: the student never sees a training image
    "zskt+abd": ("abd", {"data_free": True}),
    "kdiga": ("kdiga", {}),
    "fkd+iga": ("fkd", {"iga_lambda": 1.0}),
    "robustkd-ta+iga": ("robustkd-ta", {"iga_lambda": 1.0}),
    "kd": ("kd", {}),  # Hinton KD, the comparison student for KDIGA
}
DEFAULT_VARIANTS = ["fkd", "robustkd", "robustkd-tau-search", "robustkd-ta", "robustkd-ta (noise control)"]

# The faithful method's ablations (paper Figs. 4-7) on one attack: name -> overrides of `robustkd`.
ABLATIONS: dict[str, dict] = {  # tau 0.1 / eq7 / var+ce / all stages / lr 1e-3 is the main table's row
    "tau 0.05": {"tau": 0.05},
    "tau 0.3": {"tau": 0.3},
    "tau 0.6": {"tau": 0.6},
    "eq15": {"detox_form": "eq15"},
    "loss var": {"detox_loss": "var"},
    "loss ce": {"detox_loss": "ce"},
    "stages last": {"detox_stages": "last"},
}

# Paper anchors (algorithms.md §6, RobustKD Tables 4/5; CIFAR-100, WRN-28-4 -> students), for reference only.
PAPER_REFERENCE = (
    "RobustKD paper, Tables 4/5 (CIFAR-100/CIFAR-10, 300 epochs, A100): FKD students keep most of the "
    "backdoor (ASR often > 70%), RobustKD students report ASR mostly below 10% at about 1-3 points ACC cost. "
    "Those are the paper's numbers on its data and budget, not reproduced here."
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def folder_name(kind: str) -> str:
    return "clean" if kind == "none" else kind


CARRY_KINDS = ("badnets", "blend", "ckd", "lba", "adaptive", "ta-aware")  # kinds --carry-check applies to


def teacher_folder(
    kind: str, root: Path, device: str, adv: bool = False, carry_check: float | None = None
) -> Path:
    """Gives back the attack folder for `kind` under root, training it (once) when it is missing; `adv`:
    adversarially trained; `carry_check`: re-planted until a fresh FKD student keeps that ASR (`rkdtool attack
    --carry-check`, the kinds of CARRY_KINDS). A folder made otherwise is refused, not reused."""
    out = root / folder_name(kind)
    carry = carry_check if kind in CARRY_KINDS else None
    if (out / "attack.json").exists():
        made = json.loads((out / "attack.json").read_text())
        if "adv_train" not in made:  # made before attack.json recorded it
            print(f"{out}: attack.json does not say whether it was adversarially trained; taken as given")
        elif made["adv_train"] != adv:
            raise SystemExit(
                f"{out} holds a teacher {'not ' if adv else ''}adversarially trained: "
                f"give --teachers another folder{' for --adv-teachers' if adv else ''}"
            )
        made_carry = (made.get("carry_check") or {}).get("goal")
        if made_carry != carry:
            raise SystemExit(
                f"{out} holds a teacher made with carry check {made_carry} (here: {carry}): give --teachers "
                "another folder"
            )
        return out
    config = AttackConfig(kind=kind, device=device, finetune_epochs=5, adv_train=adv, carry_check=carry)
    if kind in ("ckd", "lba", "adaptive", "quant", "ta-aware"):
        config = replace(config, from_teacher=str(teacher_folder("none", root, device, adv)))
    print(f"training the {kind} teacher into {out}", flush=True)
    write_attack(run_attack(config), out)
    return out


def run_variant(
    variant, teacher, arch, student_arch, data, probes, seed, epochs, device, pgd: PgdBudget = PgdBudget()
) -> dict:
    """Gives back one student's result for `variant`, with the one-time cost, seconds per epoch (per chunk
    of rounds when data-free) and robust accuracy (PGD-Linf, `pgd`'s budget, on the test split)."""
    method, overrides = VARIANTS[variant] if isinstance(variant, str) else variant
    generator = seed_everything(seed)
    config = replace(DistillConfig(), method=method, seed=seed, epochs=epochs, **overrides)
    student = build_model(student_arch, data.num_classes)
    began = time.perf_counter()
    diagnostics: dict = {}
    if config.data_free:
        free, free_recipe, options = prepare_data_free(
            method,
            student,
            teacher,
            arch,
            student_arch,
            data,
            epochs=epochs,
            batch_size=64,
            generator=generator,
        )
        setup = time.perf_counter() - began
        result = train_data_free(
            free, data, free_recipe, probes, generator=generator, device=device, retrospection=options
        )
    else:
        distiller, diagnostics, _masks = prepare_method(
            method,
            student,
            teacher,
            arch,
            student_arch,
            data,
            probes,
            config,
            generator=generator,
            device=device,
        )
        setup = time.perf_counter() - began
        recipe = StudentRecipe(epochs=epochs)
        result = train_student(distiller, data, recipe, probes, generator=generator, device=device)
        if retrospects(method, config):
            retrospect(
                distiller,
                data,
                recipe,
                epochs=retrospection_length(epochs),
                generator=generator,
                device=device,
            )
            result.update(evaluate_student(student, data, probes))
    pgd_acc = robust_accuracy(
        student.eval(),
        data.test_images,
        data.test_labels,
        mean=data.mean,
        std=data.std,
        budget=pgd,
        generator=torch.Generator().manual_seed(seed),
    )
    detox = diagnostics.get("detox", {})
    return {
        **result,
        "pgd_acc": pgd_acc,
        "setup_seconds": setup,
        "tau": (diagnostics.get("tau_search") or {}).get("chosen", detox.get("tau")),
        "detoxified_teacher": detox.get("detoxified_teacher"),
        "suspected_target": (diagnostics.get("synthesis") or {}).get("suspected_target"),
    }


def _load(folder: Path, data, device):
    teacher, meta = build_from_weights(folder / "teacher.safetensors")
    probes = [p.bind(data.mean, data.std) for p in load_probes(folder / "probes.toml")]
    return teacher.to(device), meta, probes


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def evaluate_attack(attack: str, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Gives back (the attack's teacher facts, one row per variant) for one attack (a worker's unit)."""
    device = resolve_device(args.device)
    data = load_dataset("digits")
    clean_model, _, _ = _load(args.teachers / "clean", data, device)
    teacher, meta, probes = _load(args.teachers / folder_name(attack), data, device)
    probe = probes[0].name
    made = json.loads((args.teachers / folder_name(attack) / "attack.json").read_text())
    control = evaluate_student(clean_model, data, probes)
    info = {
        "teacher_acc": made["acc"],
        "teacher_asr": made["asr"][probe],
        "clean_teacher_acc": control["acc"],
        "clean_teacher_asr": control["asr"][probe],
        "random_pattern_asr": made["random_pattern_asr"].get(probe),
        "probe": probe,
        "carry_check": made.get("carry_check"),
        "teacher_pgd_acc": robust_accuracy(
            teacher.eval(),
            data.test_images,
            data.test_labels,
            mean=data.mean,
            std=data.std,
            budget=pgd_budget(args),
            generator=torch.Generator().manual_seed(0),
        ),
    }
    rows = []
    carried = True
    for variant in args.variants:
        method, overrides = VARIANTS[variant]
        runs = []
        # Defences are measured in depth where FKD carries a backdoor; elsewhere on the first seed only,
        # unless the teachers are adversarially trained: then robust accuracy is the point, on every seed.
        seeds = args.seeds if carried or method == "fkd" or args.adv_teachers else args.seeds[:1]
        for seed in seeds:
            r = run_variant(
                (method, overrides),
                teacher,
                meta["arch"],
                args.student,
                data,
                probes,
                seed,
                args.epochs,
                device,
                pgd_budget(args),
            )
            runs.append(r)
            if overrides.get("tau_search"):  # searched once (first seed); later seeds reuse its tau
                overrides = {**overrides, "tau_search": False, "tau": r["tau"]}
            print(
                f"{attack:9} {variant:26} seed {seed}: ACC {r['acc']:.3f} ASR {r['asr'][probe]:.3f} "
                f"PGD {r['pgd_acc']:.3f} "
                f"({r['seconds_per_epoch']:.1f} s/epoch, setup {r['setup_seconds']:.0f} s)",
                flush=True,
            )
        acc, acc_std = _mean_std([r["acc"] for r in runs])
        asr, asr_std = _mean_std([r["asr"][probe] for r in runs])
        rows.append(
            {
                "attack": attack,
                "method": variant,
                **{k: info[k] for k in ("teacher_acc", "teacher_asr", "clean_teacher_asr")},
                "acc": acc,
                "asr": asr,
                "acc_std": acc_std,
                "asr_std": asr_std,
                "acc_per_seed": [r["acc"] for r in runs],
                "asr_per_seed": [r["asr"][probe] for r in runs],
                "pgd_acc": statistics.fmean(r["pgd_acc"] for r in runs),
                "pgd_acc_per_seed": [r["pgd_acc"] for r in runs],
                "seeds": seeds,
                "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs),
                "setup_seconds": statistics.fmean(r["setup_seconds"] for r in runs),
                "tau": [r["tau"] for r in runs],
                "detoxified_teacher_asr": [
                    (r["detoxified_teacher"] or {}).get("asr", {}).get(probe) for r in runs
                ],
                "suspected_target": [r["suspected_target"] for r in runs],
            }
        )
        if method == "fkd":
            carried = rows[-1]["asr"] >= 0.5
    fkd = next((r for r in rows if r["method"] == "fkd"), None)
    info["fkd_carries"] = None if fkd is None else fkd["asr"] >= 0.5
    for r in rows:
        r["fkd_carries"] = info["fkd_carries"]
    return info, rows


def pgd_budget(args: argparse.Namespace) -> PgdBudget:
    """Gives back the robust-accuracy attack: `--pgd-eps`, step eps/4, 20 steps (8/255 and 2/255 by default,
    the CIFAR protocol)."""
    return PgdBudget(eps=args.pgd_eps, step=args.pgd_eps / 4, steps=20)


def run_ablations(args: argparse.Namespace) -> list[dict]:
    """Gives back the faithful method's ablation rows on `--ablation-attack` (first seed only)."""
    device = resolve_device(args.device)
    data = load_dataset("digits")
    teacher, meta, probes = _load(args.teachers / args.ablation_attack, data, device)
    out = []
    for name, overrides in ABLATIONS.items():
        r = run_variant(
            ("robustkd", overrides), teacher, meta["arch"], args.student, data, probes,
            args.seeds[0], args.epochs, device,
        )  # fmt: skip
        detox = r["detoxified_teacher"] or {}
        out.append(
            {
                "attack": args.ablation_attack,
                "variant": name,
                "overrides": overrides,
                "seed": args.seeds[0],
                "acc": r["acc"],
                "asr": r["asr"][probes[0].name],
                "detoxified_teacher_asr": detox.get("asr", {}).get(probes[0].name),
                "detoxified_teacher_acc": detox.get("acc"),
            }
        )
        print(f"ablation {name:18}: ACC {r['acc']:.3f} ASR {out[-1]['asr']:.3f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=["lba", "ckd", "adaptive", "badnets", "blend"])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=sorted(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--student", default="wrn10-1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ablation-attack", default="lba")
    parser.add_argument("--teachers", type=Path, default=None, help="default runs/efficacy-teachers[-adv]")
    parser.add_argument(
        "--adv-teachers",
        action="store_true",
        help="adversarially trained teachers (PGD-Linf 8/255), every variant on every seed",
    )
    parser.add_argument(
        "--carry-check",
        type=_fraction,
        default=None,
        metavar="ASR",
        help=f"teachers of the poisoning kinds re-planted (at most {AttackConfig.carry_attempts} times) "
        "until a fresh FKD check student keeps this ASR on held-out training images "
        "(rkdtool attack --carry-check)",
    )
    parser.add_argument(
        "--pgd-eps", type=_fraction, default=8 / 255, help="robust accuracy's L-inf budget (8/255)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="attacks evaluated in parallel processes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "efficacy")
    parser.add_argument("--render", action="store_true", help="only re-render OUT.md from OUT.json")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only these attacks' rows (and the ablations, if run) in an existing OUT.json",
    )
    args = parser.parse_args()
    if args.teachers is None:
        args.teachers = Path("runs/efficacy-teachers" + ("-adv" if args.adv_teachers else ""))
    if args.render:
        args.out.with_suffix(".md").write_text(
            render_markdown(json.loads(args.out.with_suffix(".json").read_text()))
        )
        return
    device = resolve_device(args.device)
    started = time.perf_counter()
    for attack in ["none", *args.attacks]:  # train missing teachers first, one at a time
        teacher_folder(attack, args.teachers, str(device), args.adv_teachers, args.carry_check)
    units = [("attack", a) for a in args.attacks] + ([("ablations", None)] if args.ablations else [])
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    attacks, rows, ablations = {}, [], []
    with ProcessPoolExecutor(
        args.jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads,),
    ) as pool:
        futures = {
            (kind, name): pool.submit(evaluate_attack, name, args)
            if kind == "attack"
            else pool.submit(run_ablations, args)
            for kind, name in units
        }
        for (kind, name), future in futures.items():
            if kind == "attack":
                attacks[name], found = future.result()
                rows += found
            else:
                ablations = future.result()
    budget = {
        "teacher": "wrn16-1 (attack kit defaults)",
        "student": args.student,
        "student_epochs": args.epochs,
        "seeds": args.seeds,
        "variants": {v: {"method": VARIANTS[v][0], **VARIANTS[v][1]} for v in args.variants},
        "attacks": args.attacks,
        "adv_teachers": args.adv_teachers,
        "carry_check": args.carry_check,
        "pgd": pgd_budget(args).describe(),
        "jobs": args.jobs,
        "command": "python benchmarks/efficacy.py " + " ".join(sys.argv[1:]),
        "wall_seconds": round(time.perf_counter() - started),
    }
    machine = {
        "node": platform.node(),
        "processor": cpu_name(),
        "cpu_flags": cpu_flags(),
        "numerics_env": numerics_environment(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "device": str(device),
        "torch": torch.__version__,
    }
    report = {
        "machine": machine,
        "dataset": "digits",
        "budget": budget,
        "attacks": attacks,
        "rows": rows,
        "ablations": ablations,
        "paper_reference": PAPER_REFERENCE,
    }
    if args.merge and args.out.with_suffix(".json").exists():
        report = merge_reports(json.loads(args.out.with_suffix(".json").read_text()), report, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))


def merge_reports(old: dict, new: dict, args: argparse.Namespace) -> dict:
    """Gives back `old` with the attacks `new` ran (teachers and rows) and, when run, its ablations replaced;
    the budget keeps the original run's command and lists each update with its own command and wall time."""
    if old["budget"]["seeds"] != new["budget"]["seeds"] or old["budget"]["student_epochs"] != args.epochs:
        raise SystemExit("--merge needs the same seeds and epochs as the table it updates")
    # tables written before these keys existed came from plain teachers and the default PGD budget
    defaults = {"adv_teachers": False, "carry_check": None, "pgd": PgdBudget().describe()}
    for key, default in defaults.items():
        there, here = old["budget"].get(key, default), new["budget"].get(key, default)
        if there != here:
            raise SystemExit(
                f"--merge needs the same {key} as the table it updates ({there} there, {here} here)"
            )
    merged = dict(old)
    merged["attacks"] = {**old["attacks"], **new["attacks"]}
    merged["rows"] = [r for r in old["rows"] if r["attack"] not in new["attacks"]] + new["rows"]
    merged["rows"].sort(key=lambda r: list(merged["attacks"]).index(r["attack"]))
    if args.ablations:
        merged["ablations"] = new["ablations"]
    update = {k: new["budget"][k] for k in ("command", "wall_seconds", "attacks", "jobs")}
    update["date"] = time.strftime("%Y-%m-%d %H:%M")
    merged["budget"] = {**old["budget"], "updates": [*old["budget"].get("updates", []), update]}
    return merged


def goal_section(report: dict) -> list[str]:
    """Gives back the issue's goal, checked on the rows: on every attack FKD carries, the best defence (the
    lowest mean ASR among variants whose mean ACC is within 3 points of FKD's) at most 10% ASR (5% for
    BadNets and Blend)."""
    lines = [
        "",
        "## Goal check",
        "",
        "On every attack FKD carries (FKD student ASR >= 50%): the best defence, using only what a defender "
        "has, at most 10% ASR (5% for BadNets and Blend), ACC within 3 points of the FKD student's.",
        "",
        "| attack | FKD carries | FKD ACC / ASR | best defence | its ACC / ASR | met |",
        "|---|---|---|---|---|---|",
    ]
    for attack, info in report["attacks"].items():
        rows = [r for r in report["rows"] if r["attack"] == attack]
        fkd = next((r for r in rows if r["method"] == "fkd"), None)
        if fkd is None:
            continue
        eligible = [
            r
            for r in rows
            if r["method"] != "fkd" and "control" not in r["method"] and r["acc"] >= fkd["acc"] - 0.03
        ]
        best = min(eligible, key=lambda r: r["asr"], default=None)
        bar = 0.05 if attack in ("badnets", "blend") else 0.10
        met = (
            "n/a (not carried)"
            if not info.get("fkd_carries")
            else ("yes" if best and best["asr"] <= bar else "no")
        )
        numbers = f"{100 * best['acc']:.1f} / {100 * best['asr']:.1f}" if best else "-"
        lines.append(
            f"| {attack} | {info.get('fkd_carries')} | {100 * fkd['acc']:.1f} / {100 * fkd['asr']:.1f} | "
            f"{best['method'] if best else '-'} | {numbers} | {met} |"
        )
    return lines


def _fraction(text: str) -> float:
    """Parses 8/255 or 0.03 (argparse type)."""
    top, _, bottom = text.partition("/")
    return float(top) / float(bottom) if bottom else float(top)


def _pgd_words(pgd: dict | None) -> str:
    if pgd is None:  # tables made before the budget was recorded
        return "PGD-Linf 8/255, step 2/255, 20 steps"
    return f"PGD-Linf {255 * pgd['eps']:.0f}/255, step {255 * pgd['step']:.0f}/255, {pgd['steps']} steps"


def _pgd_cell(row: dict) -> str:
    per_seed = row.get("pgd_acc_per_seed")
    if not per_seed:
        return _percent(row.get("pgd_acc"))
    mean, std = _mean_std(per_seed)
    return f"{100 * mean:.1f} +- {100 * std:.1f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"  # rows of tables made before the column existed


def _carry_words(goal: float | None) -> str:
    if goal is None:
        return ""
    return (
        f", re-planted with another seed (at most {AttackConfig.carry_attempts} plantings) until a fresh "
        f"FKD check student keeps >= {100 * goal:.0f}% ASR on held-out training images "
        "(`rkdtool attack --carry-check`)"
    )


def _plantings(carry: dict | None) -> str:
    """Gives back the teachers table's cell: plantings, passed or not, and the kept one's check ASR."""
    if not carry:
        return "-"
    kept = carry["attempts"][carry["chosen"]]
    verdict = "passed" if carry["passed"] else "not passed"
    return (
        f"{len(carry['attempts'])}, {verdict} (seed {carry['seed']}: check "
        f"{100 * kept['student_held_asr']:.1f}%)"
    )


def render_markdown(report: dict) -> str:
    budget, machine = report["budget"], report["machine"]
    lines = [
        "# Efficacy on digits",
        "",
        f"Generated by `{budget['command'].strip()}` ({budget['wall_seconds']} s wall). Machine: "
        f"{machine['processor']} ({', '.join(machine.get('cpu_flags', [])) or 'no flags recorded'}; "
        f"numerics environment {machine.get('numerics_env') or 'default'}), {machine['cpus']} CPUs, "
        f"{machine['threads']} torch threads, "
        f"device {machine['device']}, torch {machine['torch']}, {budget['jobs']} worker process(es).",
        f"Budget: teacher {budget['teacher']}"
        f"{', adversarially trained (PGD-Linf 8/255, 3 steps)' if budget.get('adv_teachers') else ''}"
        f"{_carry_words(budget.get('carry_check'))}, "
        f"student {budget['student']}, {budget['student_epochs']} epochs, seeds {budget['seeds']}. "
        f"PGD ACC: {_pgd_words(budget.get('pgd'))}.",
        *[
            f"Updated {u['date']}: rows of {', '.join(u['attacks'])} rerun by `{u['command'].strip()}` "
            f"({u['wall_seconds']} s wall, {u['jobs']} worker process(es))."
            for u in budget.get("updates", [])
        ],
        "",
        "ASR is on the attack's own (true) trigger, non-target test images (324 of 360); it is never used by "
        "a defence. Student ACC/ASR are mean +- sd over the seeds. 'FKD carries' = FKD student ASR >= 50% "
        "(mean over the seeds); where FKD does not carry the backdoor, the defences ran on the first seed "
        "only (the seeds column says which), unless the teachers are adversarially trained. The tau search "
        "runs once per attack (first seed); later seeds reuse its tau.",
        "",
        "## Teachers",
        "",
        "| attack | probe | teacher ACC | teacher ASR | teacher PGD ACC | clean-teacher ASR "
        "| random pattern ASR | plantings (carry check) | FKD carries "
        "| suspected target (synthesis, per seed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in report["attacks"].items():
        suspected = next(
            (
                r["suspected_target"]
                for r in report["rows"]
                if r["attack"] == name and any(t is not None for t in r["suspected_target"])
            ),
            [],
        )
        lines.append(
            f"| {name} | {a['probe']} | {100 * a['teacher_acc']:.1f} | {100 * a['teacher_asr']:.1f} | "
            f"{_percent(a.get('teacher_pgd_acc'))} | {100 * a['clean_teacher_asr']:.1f} | "
            f"{100 * (a['random_pattern_asr'] or 0):.1f} | {_plantings(a.get('carry_check'))} | "
            f"{a.get('fkd_carries')} | {', '.join(str(t) for t in suspected) or 'none'} |"
        )
    lines += [
        "",
        "## Students",
        "",
        "| attack | variant | seeds | ACC | ASR | ASR per seed | PGD ACC | tau | detoxified teacher ASR "
        "| s/epoch | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        detox = [f"{100 * v:.0f}" for v in r["detoxified_teacher_asr"] if v is not None]
        taus = sorted({t for t in r["tau"] if t is not None})
        lines.append(
            f"| {r['attack']} | {r['method']} | {len(r['seeds'])} | "
            f"{100 * r['acc']:.1f} +- {100 * r['acc_std']:.1f} | "
            f"{100 * r['asr']:.1f} +- {100 * r['asr_std']:.1f} | "
            f"{', '.join(f'{100 * v:.1f}' for v in r['asr_per_seed'])} | "
            f"{_pgd_cell(r)} | {', '.join(map(str, taus)) or '-'} | "
            f"{', '.join(detox) or '-'} | "
            f"{r['seconds_per_epoch']:.1f} | {r['setup_seconds']:.0f} |"
        )
    lines += goal_section(report)
    lines += ["", "Variants:", ""]
    for name, spec in budget["variants"].items():
        lines.append(f"- `{name}`: {json.dumps(spec)}")
    if report["ablations"]:
        lines += [
            "",
            f"## Ablations of the faithful method (attack {report['ablations'][0]['attack']}, "
            f"seed {report['ablations'][0]['seed']})",
            "",
            "| variant | ACC | ASR | detoxified teacher ACC | detoxified teacher ASR |",
            "|---|---|---|---|---|",
        ]
        for a in report["ablations"]:
            lines.append(
                f"| {a['variant']} | {100 * a['acc']:.1f} | {100 * a['asr']:.1f} | "
                f"{100 * (a['detoxified_teacher_acc'] or 0):.1f} | "
                f"{100 * (a['detoxified_teacher_asr'] or 0):.1f} |"
            )
    lines += ["", report["paper_reference"], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
