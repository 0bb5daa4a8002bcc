"""The main job's settings (`rkdtool distill`'s options, resolved) and the labels reports derive from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from rkdtool.data import ImageData
from rkdtool.errors import UsageError

SYNTH_SOURCES = ("uap", "bank", "noise")


@dataclass
class DistillConfig:
    teacher: str = "demo:ckd"
    student: str | None = None  # default: wrn10-1 for demo teachers (time budget), else wrn16-2
    data: str | None = None  # default: the teacher's dataset when known, else digits
    method: str = "robustkd-ta"  # the measured winner (benchmarks/results/efficacy.md); robustkd = the paper
    baseline: bool = True
    probes: list[str] = field(default_factory=list)
    epochs: int | None = None  # default: 10 on digits, 200 elsewhere (the FKD recipe)
    batch_size: int = 64
    lr: float = 0.1
    clean_fraction: float = 1.0
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    tau: float = 0.1
    detox_epochs: int | None = None  # default: 5 on digits (budget), 40 elsewhere (the paper)
    detox_form: str = "eq7"
    detox_stages: str = "all"
    detox_loss: str = "var+ce"
    teacher_bn: str = "eval"
    student_noise: float = 0.1
    temperature: float = 4.0
    detox_lr: float = 1e-3  # Adam lr of the masks (paper)
    tau_search: bool = False  # Algorithm 1: pick tau on a held-out split, with synthesised triggers
    synth_budget: float = 0.2  # L-inf radius / blend alpha of the synthesised perturbations
    synth_epochs: int = 3
    synth_pool: str = "uap"  # stand-ins: uap (synthesised), bank (common triggers), noise (control); +
    synth_refresh: int = 0  # robustkd-ta: every N epochs also synthesise a perturbation against the student
    refresh_kind: str = "linf1"  # the refreshed perturbation's kind (probes.uap.KINDS)
    refresh_budget: float | None = None  # its budget; default --synth-budget
    iga_lambda: float | None = None  # input-gradient alignment weight; default 1 for kdiga, else 0
    data_free: bool = False  # ZSKT: the student learns from a generator's images, never a training image
    abd_sr: bool | None = None  # ABD's Self-Retrospection after training; default: on for --method abd
    abd_sv: bool = False  # ABD's Shuffling Vaccine re-weighting fkd's, robustkd's or robustkd-ta's images
    pgd: bool = False  # also robust accuracy (PGD-Linf 8/255, step 2/255, 20 steps) of teacher and students
    eval_every: int = 1  # ACC/ASR every N epochs (and after the last)
    amp: bool = False  # bf16 autocast on CPU; bf16 or fp16 + GradScaler on CUDA (trainer.amp_dtype)
    channels_last: bool | None = None  # NHWC; None: the device's default (trainer.default_channels_last)
    teacher_arch: str | None = None
    trust_pickle: bool = False
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None


def synth_sources(pool: str) -> set[str]:
    """Gives back the stand-in sources a `--synth-pool` value joins with '+' (uap, bank, noise)."""
    sources = set(pool.split("+"))
    if not sources <= set(SYNTH_SOURCES):
        raise UsageError(f"--synth-pool joins uap, bank and noise with '+', got {pool!r}")
    return sources


def iga_lambda(method: str, config: DistillConfig) -> float:
    """Gives back the input-gradient alignment weight: --iga-lambda, else 1 for kdiga and 0 otherwise."""
    if config.iga_lambda is not None:
        return config.iga_lambda
    return 1.0 if method == "kdiga" else 0.0


DATA_FREE_METHODS = ("kd", "abd")


SV_METHODS = ("fkd", "robustkd", "robustkd-ta")  # --abd-sv: feature distillers whose images SV re-weights


def student_name(method: str, config: DistillConfig) -> str:
    """Gives back the name a student is reported and written under: the method, or with --data-free zskt
    (kd on generated images) and zskt+abd; + sv and + sr when ABD's pieces join another method."""
    if config.data_free:
        return "zskt+abd" if method == "abd" else "zskt"
    if method == "abd":
        return method
    extras = [("sv", vaccinates(method, config)), ("sr", retrospects(method, config))]
    return "+".join([method, *(name for name, on in extras if on)])


def vaccinates(method: str, config: DistillConfig) -> bool:
    """True when ABD's Shuffling Vaccine re-weights this method's training images (abd, or --abd-sv on a
    feature distiller; never the FKD baseline, which stays the plain comparison)."""
    if method == "abd":
        return True
    if method == "fkd" and config.method != "fkd":
        return False
    return config.abd_sv and method in SV_METHODS


def retrospects(method: str, config: DistillConfig) -> bool:
    """True when ABD's Self-Retrospection phase follows this method's training (abd, or --abd-sr; never
    the FKD baseline, which stays the plain comparison)."""
    if method == "fkd" and config.method != "fkd":
        return False
    return config.abd_sr if config.abd_sr is not None else method == "abd"


def default_detox_epochs(config: DistillConfig, data: ImageData) -> int:
    """Gives back --detox-epochs, defaulting to 5 on digits (the demo's budget) and 40 elsewhere (paper)."""
    return config.detox_epochs or (5 if data.name == "digits" else 40)


def needs_pool(method: str, config: DistillConfig) -> bool:
    """True when the method or its detox loss uses synthesised trigger stand-ins."""
    return method == "robustkd-ta" or (method.startswith("robustkd") and "inv" in config.detox_loss)


def describe_variant(config: DistillConfig) -> str:
    """Gives back a one-line label of the method variant and the settings that define it (for reports)."""
    weight = iga_lambda(config.method, config)
    iga = f" + input-gradient alignment (lambda {weight:g})" if weight else ""
    sr = (
        " + Self-Retrospection (ABD)" if retrospects(config.method, config) and config.method != "abd" else ""
    )
    if config.method != "abd" and vaccinates(config.method, config):
        sr = " + Shuffling Vaccine re-weighting (ABD)" + sr
    if config.data_free:
        vaccine = " + ABD (Shuffling Vaccine in the generator loss, Self-Retrospection)"
        return "data-free ZSKT" + (vaccine if config.method == "abd" else "")
    if config.method == "abd":
        return "abd: KD re-weighted by the Shuffling Vaccine, then Self-Retrospection" + iga
    if config.method in ("fkd", "kd", "kdiga"):
        return config.method + iga + sr
    tau = "tau by search (Algorithm 1)" if config.tau_search else f"tau {config.tau}"
    parts = [
        f"detox {config.detox_form} on {config.detox_stages} stages, loss {config.detox_loss}, {tau}",
        f"student noise {config.student_noise}",
    ]
    if needs_pool(config.method, config):
        budget = config.synth_budget if config.refresh_budget is None else config.refresh_budget
        refresh = (
            f", a {config.refresh_kind} of budget {budget} refreshed against the student every "
            f"{config.synth_refresh} epoch(s)"
        )
        parts.append(
            f"trigger stand-ins {config.synth_pool} (budget {config.synth_budget}"
            f"{refresh if config.synth_refresh else ''})"
        )
    if config.method == "robustkd-ta":
        parts.append("trigger-consistency distillation")
    label = (
        "paper-faithful RobustKD" if config.method == "robustkd" and "inv" not in config.detox_loss else ""
    )
    return f"{config.method}{f' ({label})' if label else ''}: " + "; ".join(parts) + iga + sr
