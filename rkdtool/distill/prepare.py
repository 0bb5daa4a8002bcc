"""A distillation method made ready to train: its detox masks (RobustKD Stage A; with `--tau-search`, tau
chosen first by the paper's Algorithm 1), its trigger stand-ins (robustkd-ta), and the diagnostics reports
show. The main job and `benchmarks/efficacy.py` both prepare methods here, so they run the same code.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, replace

import torch

from rkdtool.data import ImageData, normalize
from rkdtool.distill.abd import ShufflingVaccine
from rkdtool.distill.config import (
    DistillConfig,
    default_detox_epochs,
    iga_lambda,
    needs_pool,
    synth_sources,
    vaccinates,
)
from rkdtool.distill.methods import METHODS, MethodOptions
from rkdtool.distill.robustkd import DetoxConfig, DetoxifiedTeacher, fit_detox_masks
from rkdtool.distill.trainer import StudentRecipe, evaluate_student, train_student
from rkdtool.errors import UsageError
from rkdtool.models import build_model, parse_arch, placement
from rkdtool.probes.bank import probe_bank
from rkdtool.probes.spec import Probe
from rkdtool.probes.uap import KINDS, RandomNoise, perturbation_sink, synthesise_uap
from rkdtool.training import ProgressFn, batches, no_progress


def prepare_method(
    method: str,
    student,
    teacher_model,
    teacher_arch: str,
    student_arch: str,
    data: ImageData,
    probes: list[Probe],
    config: DistillConfig,
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    pool: list | None = None,
):
    """Gives back (distiller, diagnostics, detox masks or None) for one method, fitting what it needs first.

    robustkd*: detox masks (Stage A; with --tau-search, tau chosen by Algorithm 1 first), reported with the
    detoxified teacher's own ACC/ASR and mask statistics; robustkd-ta and trigger-aware detox losses: also
    the pool of trigger stand-ins and where the synthesised ones sink images (the suspected target).
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    teacher_taps, student_taps = parse_arch(teacher_arch).taps, parse_arch(student_arch).taps
    options = MethodOptions(
        temperature=config.temperature, teacher_bn=config.teacher_bn, iga_lambda=iga_lambda(method, config)
    )
    kwargs: dict = {}
    diagnostics: dict = {}
    masks = None
    if pool is None and needs_pool(method, config):
        pool, diagnostics["synthesis"] = synthesise_pool(
            teacher_model, data, config, generator, device, progress
        )
    pool = pool or []
    if method.startswith("robustkd"):
        if config.tau_search:
            diagnostics["tau_search"] = search_tau(
                method,
                teacher_model,
                teacher_arch,
                student_arch,
                data,
                config,
                pool,
                generator=generator,
                device=device,
                progress=progress,
            )
            config = replace(config, tau=diagnostics["tau_search"]["chosen"])
        detox_config = detox_config_for(config, data)
        masks = fit_detox_masks(
            teacher_model,
            teacher_taps,
            data,
            detox_config,
            generator=generator,
            device=device,
            progress=progress,
            pool=pool,
        )
        detoxified = DetoxifiedTeacher(teacher_model, teacher_taps, masks)
        diagnostics["detox"] = {
            **asdict(detox_config),
            "mask_statistics": masks.statistics(),
            "detoxified_teacher": evaluate_student(detoxified, data, probes),
        }
        kwargs["detox"] = masks
        options = MethodOptions(**{**asdict(options), "student_noise": config.student_noise})
    if vaccinates(method, config):
        kwargs["vaccine"], diagnostics["vaccine"] = fit_vaccine(
            teacher_model,
            [normalize(x, data.mean, data.std) for x in _training_batches(data, generator)],
            generator,
            device,
        )
    if method == "robustkd-ta":
        kwargs.update(
            pool=pool,
            refresh_every=config.synth_refresh,
            refresh_kind=config.refresh_kind,
            refresh_budget=config.synth_budget if config.refresh_budget is None else config.refresh_budget,
        )
    distiller = METHODS[method](
        student, teacher_model, student_taps, teacher_taps, options, data.mean, data.std, **kwargs
    )
    return distiller, diagnostics, masks


VACCINE_CHECK_BATCHES = 8


def _training_batches(data: ImageData, generator: torch.Generator) -> list[torch.Tensor]:
    """Gives back the first VACCINE_CHECK_BATCHES training batches of 64, in pixel space."""
    drawn = batches(data.train_images, data.train_labels, 64, generator)
    return [images for images, _ in itertools.islice(drawn, VACCINE_CHECK_BATCHES)]


def fit_vaccine(
    teacher_model, inputs: list[torch.Tensor], generator: torch.Generator, device: torch.device
) -> tuple[ShufflingVaccine, dict]:
    """Gives back ABD's Shuffling Vaccine on `teacher_model`, its shuffle kept by the tail-ratio check on
    `inputs` (batches in the teacher's input space), and what the check found, for the report."""
    vaccine = ShufflingVaccine(teacher_model, generator=generator)
    vaccine.quality_check([x.to(device) for x in inputs])
    return vaccine, vaccine.describe()


def detox_config_for(config: DistillConfig, data: ImageData) -> DetoxConfig:
    return DetoxConfig(
        tau=config.tau,
        form=config.detox_form,
        stages=config.detox_stages,
        loss=config.detox_loss,
        epochs=default_detox_epochs(config, data),
        lr=config.detox_lr,
    )


TAU_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.6)


def search_tau(
    method: str,
    teacher_model,
    teacher_arch: str,
    student_arch: str,
    data: ImageData,
    config: DistillConfig,
    pool: list,
    *,
    generator: torch.Generator,
    device: torch.device,
    progress: ProgressFn = no_progress,
    grid: tuple[float, ...] = TAU_GRID,
    delta_acc: float = 0.05,
    delta_asr: float = 0.10,
) -> dict:
    """Algorithm 1 as a grid (algorithms.md §2.4 Stage C): gives back the tau to use and every trial.

    Each tau fits masks and runs a proxy distillation (a fifth of the epochs, at least 2) on 90% of the
    clean training split; the held-out 10% scores it. ASR for the choice comes from what a defender has:
    universal perturbations synthesised from the teacher (and the pool's other stand-ins), scored as the
    share of held-out images they send to the synthesised perturbations' suspected target, or to their
    dominant class when none is suspected. The given probes are never used to choose. Accept tau when the
    proxy student's ACC is within `delta_acc` of the teacher's and that ASR at most `delta_asr`; pick the
    accepted tau with the highest ACC (ties: the lower ASR), else the best ACC - ASR.
    One function (about 80 lines) so that Algorithm 1's loop reads top to bottom as in the paper.
    """
    fit, held = data.split_holdout(0.1, seed=config.seed)
    if not pool:  # robustkd without a pool: synthesise the selection triggers on the teacher
        pool = synthesise_uaps(teacher_model, fit, config, generator, device, progress)
    on_teacher = selection_scores(teacher_model, held, pool, None)
    teacher_acc, target = on_teacher["acc"], on_teacher["sink"]
    proxy_epochs = max(2, (config.epochs or 10) // 5)
    trials = []
    for tau in grid:
        trial_config = replace(config, tau=tau, tau_search=False)
        student = build_model(student_arch, data.num_classes)
        distiller, _, _ = prepare_method(
            method,
            student,
            teacher_model,
            teacher_arch,
            student_arch,
            fit,
            [],
            replace(trial_config, synth_refresh=0),
            generator=generator,
            device=device,
            progress=progress,
            pool=pool,
        )
        train_student(
            distiller,
            fit,
            StudentRecipe(epochs=proxy_epochs, batch_size=config.batch_size, lr=config.lr),
            [],
            generator=generator,
            device=device,
            progress=progress,
            task=f"tau search ({tau})",
        )
        scores = selection_scores(student, held, pool, target)
        ok = teacher_acc - scores["acc"] <= delta_acc and scores["asr"] <= delta_asr
        scores.update(tau=tau, accepted=ok)
        trials.append(scores)
    accepted = [t for t in trials if t["accepted"]]
    if accepted:
        chosen = max(accepted, key=lambda t: (t["acc"], -t["asr"]))
    else:
        chosen = max(trials, key=lambda t: t["acc"] - t["asr"])
    return {
        "chosen": chosen["tau"],
        "grid": list(grid),
        "proxy_epochs": proxy_epochs,
        "held_out_images": len(held.train_labels),
        "teacher_acc_held_out": teacher_acc,
        "selection_target": target,
        "selection_probes": "synthesised perturbations (the given probes are not used to choose)",
        "delta_acc": delta_acc,
        "delta_asr": delta_asr,
        "trials": trials,
    }


@torch.no_grad()
def selection_scores(model, held: ImageData, pool: list, target: int | None) -> dict:
    """Gives back ACC on the held-out images and the worst share the pool sends to `target` (or, without
    one, to each stand-in's dominant class), with `sink` the class the first stand-in sends most images to.
    """
    model.eval()
    images, labels = held.train_images, held.train_labels
    param_device, param_dtype = placement(model)
    x = images.to(param_device)
    acc = float((model(normalize(x, held.mean, held.std)).argmax(1).cpu() == labels).float().mean())
    worst, sink = 0.0, None
    for pert in pool:
        preds = model(normalize(pert.apply(x), held.mean, held.std)).argmax(1).cpu()
        goal = target
        if goal is None:
            goal = int(torch.bincount(preds, minlength=held.num_classes).argmax())
        sink = goal if sink is None else sink
        others = labels != goal
        if others.any():
            worst = max(worst, float((preds[others] == goal).float().mean()))
    return {"acc": acc, "asr": worst, "sink": sink}


def synthesise_uaps(teacher_model, data, config, generator, device, progress) -> list:
    """Gives back the untargeted universal perturbations of every kind (uap.KINDS) synthesised from the
    teacher on `data` at `--synth-budget` for `--synth-epochs`."""
    return [
        synthesise_uap(
            teacher_model,
            data,
            kind=kind,
            budget=config.synth_budget,
            epochs=config.synth_epochs,
            generator=generator,
            device=device,
            progress=progress,
        )
        for kind in KINDS
    ]


def synthesise_pool(teacher_model, data, config, generator, device, progress) -> tuple[list, dict]:
    """Gives back the pool of trigger stand-ins `--synth-pool` names and where the synthesised ones sink
    images (their dominant class, when at least half of them agree at >= 50%, is the suspected target)."""
    sources = synth_sources(config.synth_pool)
    pool, sinks = [], []
    if "uap" in sources:
        pool = synthesise_uaps(teacher_model, data, config, generator, device, progress)
        sinks = [asdict(perturbation_sink(teacher_model, data, pert, device)) for pert in pool]
    if "bank" in sources:
        h, w = data.train_images.shape[-2:]
        pool.extend(probe_bank(h, w))
    if "noise" in sources:  # the control: no synthesis, fresh random noise of the same budget
        pool.append(RandomNoise(config.synth_budget))
    votes = [s["dominant_class"] for s in sinks if s["share"] >= 0.5]
    return pool, {
        "pool": config.synth_pool,
        "budget": config.synth_budget,
        "epochs": config.synth_epochs,
        "refresh_every": config.synth_refresh,
        "refresh_kind": config.refresh_kind,
        "refresh_budget": config.synth_budget if config.refresh_budget is None else config.refresh_budget,
        "stand_ins": len(pool),
        "perturbations": sinks,
        "suspected_target": max(set(votes), key=votes.count) if votes else None,
    }
