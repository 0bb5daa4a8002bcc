"""The attack kit behind `rkdtool attack`: poisoned (or clean) teachers for evaluation, each measured on its
own probe and written with its probe spec (DESIGN §3, §6 Attacks; algorithms.md §3).

One module per kind (`badnets`, `blend`, `ckd`, `lba`, `adaptive`, `quant`, `ta_aware`), each a `plant(ctx)`
that trains the model in place; this module trains or takes the clean start, dispatches, and measures the
result: ACC, ASR on the kind's probe, the worst random pattern of the same kind (is the backdoor tied to its
trigger?), the clean start's ASR, and for quant the ONNX Runtime FP32/INT8 re-check.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from rkdtool.attacks import adaptive, badnets, blend, ckd, lba, quant, ta_aware
from rkdtool.attacks.carry import CHECK_ARCH, CHECK_EPOCHS, CarryCheck, attempt_seed, check_carry
from rkdtool.attacks.context import AttackConfig, AttackContext, Planted, adversarial_term
from rkdtool.attacks.int8sim import fake_int8_check, int8_onnx_check
from rkdtool.attacks.poison import badnets_probe, blend_noise_probe, poison_with_negatives
from rkdtool.data import ImageData, load_dataset
from rkdtool.errors import UsageError
from rkdtool.models import build_model, parse_arch
from rkdtool.probes.metrics import accuracy, probe_results
from rkdtool.probes.spec import Probe, save_probes
from rkdtool.training import ProgressFn, no_progress, resolve_device, seed_everything, train_classifier
from rkdtool.weights import save_weights, write_json

KINDS: dict[str, Callable[[AttackContext], Planted]] = {
    "badnets": badnets.plant,
    "blend": blend.plant,
    "ckd": ckd.plant,
    "lba": lba.plant,
    "adaptive": adaptive.plant,
    "quant": quant.plant,
    "ta-aware": ta_aware.plant,
}
ATTACK_KINDS = (*KINDS, "none")
FROM_SCRATCH_KINDS = ("none", "badnets", "blend")  # poisoned from scratch unless a clean teacher is given
# AttackConfig fields left None take the kind's value here, else the common one (algorithms.md §3.3: 0.2).
COMMON_DEFAULTS = {"alpha": 0.2, "trigger_span": False}
KIND_DEFAULTS = {"ta-aware": ta_aware.DEFAULTS}


def with_kind_defaults(config: AttackConfig) -> AttackConfig:
    """Gives back `config` with its unset (None) fields set to the kind's defaults, else the common ones."""
    defaults = {**COMMON_DEFAULTS, **KIND_DEFAULTS.get(config.kind, {})}
    return replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


@dataclass
class AttackResult:
    """A trained teacher with its probes and what was measured on it (test split)."""

    model: nn.Module
    config: AttackConfig
    probes: list[Probe]
    acc: float
    asr: dict[str, float]
    asr_all_images: dict[str, float]
    random_pattern_asr: dict[str, float]  # the same probe with random patterns (specificity control)
    clean_acc: float | None  # the clean model it was fine-tuned from, when there was one
    clean_asr: dict[str, float]  # the probes on that clean model
    int8: dict | None = None  # quant: ONNX Runtime FP32/INT8 ACC and ASR
    concealment: dict | None = None  # quant: the trigger unit and what the attacker measured choosing it
    survival: dict | None = None  # ckd/lba/adaptive with a shadow student: its ACC/ASR (shadow.py)
    carry: dict | None = None  # --carry-check: the attempts and their check students (carry.py)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {
            "kind": self.config.kind,
            "arch": self.config.arch,
            "data": self.config.data,
            "target": self.config.target,
            "seed": self.config.seed,
            "adv_train": self.config.adv_train,
            "acc": self.acc,
            "asr": self.asr,
            "asr_all_images": self.asr_all_images,
            "random_pattern_asr": self.random_pattern_asr,
            "clean_acc": self.clean_acc,
            "clean_asr": self.clean_asr,
            **({"int8": self.int8} if self.int8 is not None else {}),
            **({"concealment": self.concealment} if self.concealment is not None else {}),
            **({"shadow_student": self.survival} if self.survival is not None else {}),
            **({"carry_check": self.carry} if self.carry is not None else {}),
            "seconds": round(self.seconds, 1),
        }


def attack_data(config: AttackConfig) -> ImageData:
    """Gives back the dataset the attack trains on (a seeded subset for quick checks)."""
    data = load_dataset(config.data)
    if config.train_subset or config.test_subset:
        data = data.subset(train=config.train_subset, test=config.test_subset, seed=config.seed)
    return data


def measure(model: nn.Module, data: ImageData, probes: list[Probe], seeds=(101, 102, 103)):
    """Gives back (ACC, probe results, worst random-pattern ASR per probe) on the test split."""
    acc = accuracy(model, data.test_images, data.test_labels, mean=data.mean, std=data.std)
    results = probe_results(model, data.test_images, data.test_labels, probes, mean=data.mean, std=data.std)
    randoms = [p.random_like(s) for p in probes for s in seeds]
    random_results = probe_results(
        model, data.test_images, data.test_labels, randoms, mean=data.mean, std=data.std
    )
    worst = {p.name: max(random_results[f"{p.name}~random{s}"].asr for s in seeds) for p in probes if seeds}
    return acc, results, worst


def _check(config: AttackConfig, data: ImageData | None = None) -> None:
    if config.kind not in ATTACK_KINDS:
        raise UsageError(f"unknown attack {config.kind!r}; use one of {', '.join(ATTACK_KINDS)}")
    if not 0 <= config.poison_rate + config.negative_rate <= 1:
        raise UsageError("--poison-rate plus --negative-rate must lie in [0, 1]")
    if config.carry_check is not None:
        if not 0 < config.carry_check <= 1:
            raise UsageError(f"--carry-check must be an ASR in (0, 1], got {config.carry_check}")
        if config.kind in ("none", "quant"):
            what = (
                "a clean teacher has no backdoor" if config.kind == "none" else "quant's backdoor is INT8's"
            )
            raise UsageError(f"--carry-check does not apply to --kind {config.kind} ({what} to carry)")
    if config.carry_attempts < 1:
        raise UsageError(f"--carry-attempts must be at least 1, got {config.carry_attempts}")
    if data is not None and not 0 <= config.target < data.num_classes:
        raise UsageError(
            f"--target {config.target} is not a class of {config.data} (0..{data.num_classes - 1})"
        )


def _clean_control(ctx: AttackContext) -> Planted:
    """`--kind none`: the control sees the attacks' random-pattern negatives (half patches, half blends)
    but no poison, when trained from scratch."""
    config, target = ctx.config, ctx.target
    if config.from_teacher is None:
        patches = poison_with_negatives(badnets_probe(target), target, 0.0, config.negative_rate / 2)
        blends = poison_with_negatives(
            blend_noise_probe(target, config.alpha), target, 0.0, config.negative_rate / 2
        )
        ctx.fit(lambda x, y, g: blends(*patches(x, y, g), g), None, config.scratch_recipe, "clean teacher")
    return Planted([badnets_probe(target)])


def make_attack(
    config: AttackConfig,
    progress: ProgressFn = no_progress,
    clean: nn.Module | None = None,
    distill_student: Callable | None = None,
) -> AttackResult:
    """Gives back a teacher trained by the attack `config.kind` names, measured on its probe.

    `clean`: the clean teacher to fine-tune (`config.from_teacher` names where it came from; the caller
    loads it, `rkdtool.jobs.attack.run_attack` does for the CLI). Without it, BadNets, Blend and the
    control are trained from scratch and the other kinds train a clean model first.
    """
    _check(config)
    config = with_kind_defaults(config)
    if config.carry_check is not None and distill_student is None:
        raise UsageError("--carry-check needs a distiller: run the attack through rkdtool.jobs.attack")
    if config.from_teacher is not None and clean is None:
        raise UsageError(f"--from-teacher {config.from_teacher}: the clean teacher was not loaded")
    start = time.perf_counter()
    data = attack_data(config)
    _check(config, data)
    device = resolve_device(config.device)
    generator = seed_everything(config.seed)
    adv = adversarial_term(data, config.adv_eps) if config.adv_train else None
    from_scratch = config.kind in FROM_SCRATCH_KINDS and clean is None

    if config.kind == "quant":
        quant.head_norm(build_model(config.arch, data.num_classes))  # fails before any training
    if clean is not None:
        model = clean.to(device)
    else:
        model = build_model(config.arch, data.num_classes)
        if not from_scratch:
            train_classifier(
                model,
                data,
                config.scratch_recipe,
                generator=generator,
                device=device,
                extra_loss=adv,
                progress=progress,
                task="clean teacher",
            )
    clean_state = None if from_scratch else {k: v.detach().clone() for k, v in model.state_dict().items()}
    plant = _clean_control if config.kind == "none" else KINDS[config.kind]
    checks: list[CarryCheck] = []
    best: tuple[int, dict, Planted] | None = None  # (attempt, weights, planted) of the best check so far
    for attempt in range(config.carry_attempts if config.carry_check is not None else 1):
        if attempt:  # plant again from the same start with the attempt's own seed (carry.py)
            generator = seed_everything(attempt_seed(config.seed, attempt))
            if clean_state is None:
                model = build_model(config.arch, data.num_classes).to(device)
            else:
                model.load_state_dict(clean_state)
        ctx = AttackContext(
            model,
            parse_arch(config.arch).taps,
            data,
            replace(config, seed=attempt_seed(config.seed, attempt)),
            generator,
            device,
            progress,
            from_scratch,
            adv,
            distill_student,
        )
        planted = plant(ctx)
        if config.carry_check is None:
            break
        checks.append(check := check_carry(ctx, planted.probes[0]))
        if best is None or check.student_asr > checks[best[0]].student_asr:
            best = (attempt, copy.deepcopy(model.state_dict()), planted)
        if check.student_asr >= config.carry_check:
            break
    carry = None
    if best is not None:
        chosen, weights, planted = best
        model.load_state_dict(weights)
        carry = {
            "goal": config.carry_check,
            "arch": config.shadow_student or CHECK_ARCH,
            "epochs": CHECK_EPOCHS,
            "passed": checks[chosen].student_asr >= config.carry_check,
            "chosen": chosen,
            "seed": checks[chosen].seed,
            "attempts": [c.as_dict() for c in checks],
        }
    probes = planted.probes

    model.eval()
    acc, results, worst_random = measure(model, data, probes)
    clean_acc, clean_asr = None, {}
    if clean_state is not None:
        start_model = build_model(config.arch, data.num_classes).to(device)
        start_model.load_state_dict(clean_state)
        clean_acc, clean_results, _ = measure(start_model, data, probes, seeds=())
        clean_asr = {n: r.asr for n, r in clean_results.items()}
    int8 = _int8_recheck(model, data, probes, config, device) if config.kind == "quant" else None
    return AttackResult(
        model=model,
        config=config,
        probes=probes,
        acc=acc,
        asr={n: r.asr for n, r in results.items()},
        asr_all_images={n: r.asr_all_images for n, r in results.items()},
        random_pattern_asr=worst_random,
        clean_acc=clean_acc,
        clean_asr=clean_asr,
        int8=int8,
        concealment=planted.concealment,
        survival=planted.survival,
        carry=carry,
        seconds=time.perf_counter() - start,
    )


def _int8_recheck(
    model: nn.Module, data: ImageData, probes: list[Probe], config: AttackConfig, device
) -> dict:
    """Gives back the ONNX Runtime FP32/INT8 ACC and ASR of a quant teacher, with the torch simulation."""
    with tempfile.TemporaryDirectory() as tmp:
        simulated = fake_int8_check(
            model,
            data,
            probes,
            calib_images=config.calib_images,
            seed=config.seed,
            calibrator=config.calibration,
        )
        int8 = int8_onnx_check(
            model,
            data,
            probes,
            calibration=config.calibration,
            calib_images=config.calib_images,
            seed=config.seed,
            workdir=Path(tmp),
        )
    model.to(device)
    int8["torch-fake-int8"] = simulated
    return int8


def write_attack(result: AttackResult, out: Path) -> dict:
    """Writes `teacher.safetensors` (weights + metadata) and `probes.toml` into `out`; gives back the
    `attack --json` object (DESIGN §5: teacher, probes, acc, asr) with the controls measured."""
    config = result.config
    data = attack_data(config)
    out.mkdir(parents=True, exist_ok=True)
    probes_path = save_probes(result.probes, out)
    teacher_path = out / "teacher.safetensors"
    save_weights(
        teacher_path,
        result.model,
        {
            "arch": config.arch,
            "num_classes": data.num_classes,
            "input_size": int(data.test_images.shape[-1]),
            "mean": list(data.mean),
            "std": list(data.std),
            "dataset": config.data,
            "provenance": {"made_by": "rkdtool attack", **result.summary()},
        },
    )
    summary = {"teacher": str(teacher_path), "probes": str(probes_path), **result.summary()}
    write_json(out / "attack.json", summary)
    return summary
