"""What every attack kind of the kit is given: the settings (`AttackConfig`) and the model being poisoned with
its data, taps, seeded generator and one `fit` that trains it (`AttackContext`).

A kind is a module with `plant(ctx) -> Planted`: it trains `ctx.model` in place and gives back its probes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rkdtool.data import ImageData, denormalize, normalize
from rkdtool.errors import UsageError
from rkdtool.models import TapPoint
from rkdtool.probes.pgd import pgd_loss
from rkdtool.probes.spec import Probe
from rkdtool.training import BatchTransform, ClassifierRecipe, ProgressFn, frozen, train_classifier

ExtraLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttackConfig:
    """What `rkdtool attack` trains; defaults are sized for `digits` on a laptop CPU."""

    arch: str = "wrn16-1"
    data: str = "digits"
    kind: str = "badnets"
    target: int = 0
    epochs: int = 15  # from-scratch training (the clean model, or BadNets/Blend poisoned from scratch)
    finetune_epochs: int = 10  # poison fine-tuning of a clean model (ckd, lba, adaptive; quant: below)
    from_teacher: str | None = None  # fine-tune this clean teacher instead of training one
    poison_rate: float = 0.1
    negative_rate: float = 0.1
    alpha: float | None = None  # Blend/LBA strength; CKD's mask bound. None: the kind's (kit.KIND_DEFAULTS)
    trigger_steps: int | None = None  # trigger optimisation steps; default 60 for ckd/adaptive, 15 for lba
    finetune_lr: float = 0.02  # with the step schedule (x0.1 at 50%, x0.01 at 75%)
    toxic_weight: float = 1.0  # CKD assimilation term kept during fine-tuning
    toxic_kappa: float = 9.0  # toxic neurons are driven to the tap's mean + kappa std of its activations
    toxic_tensor: str = "distilled"  # CKD acts on the distilled pre-ReLU taps; "stream": raw stage outputs
    variance_weight: float = 1.0  # adaptive attacker's low-variance term (paper Table 7)
    latent_weight: float = 0.1  # LBA latent injection
    trigger_span: bool | None = (
        None  # keep the trigger inside the clean images' span (span.py); None: the kind's
    )
    shadow_student: str | None = None  # ckd/lba/adaptive: the shadow students' architecture (shadow.py)
    shadow_methods: tuple[str, ...] = ("fkd",)  # how they are distilled, in turn (ta-aware: fkd, robustkd-ta)
    shadow_synth_budget: float | None = None  # robustkd-ta shadows' --synth-budget (None: distill's default)
    # the attacker's carry check (carry.py): re-plant with another seed until a fresh FKD student keeps at
    # least this ASR of the backdoor, at most `carry_attempts` plantings (None: no check)
    carry_check: float | None = None
    carry_attempts: int = 5
    adv_train: bool = False
    adv_eps: float = 8 / 255
    calibration: str = "entropy"  # INT8 calibration used to check the quant attack (defender's choice)
    quant_poison_rate: float = 0.2  # quant: poisoned share while planting (the clean start resists patches)
    quant_plant_epochs: int = 8  # quant: epochs that plant the backdoor in float and in simulated INT8
    quant_plant_lr: float = 0.05
    quant_unit_epochs: int = 4  # quant: epochs that train the trigger unit
    quant_escape: float = 10.0  # quant: the unit's float response, in multiples of the clean INT8 range
    calib_images: int = 256
    batch_size: int = 64
    lr: float = 0.1
    seed: int = 0
    device: str = "auto"
    train_subset: int | None = None  # quick checks: a seeded subset of the training images
    test_subset: int | None = None

    @property
    def scratch_recipe(self) -> ClassifierRecipe:
        """Training from scratch (the clean model, or BadNets/Blend poisoned from scratch)."""
        return ClassifierRecipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)

    @property
    def finetune_recipe(self) -> ClassifierRecipe:
        """Poison fine-tuning of a clean model."""
        return ClassifierRecipe(epochs=self.finetune_epochs, batch_size=self.batch_size, lr=self.finetune_lr)


@dataclass
class Planted:
    """What a kind gives back: the probes of its backdoor, and (quant) how the float model hides it."""

    probes: list[Probe]
    concealment: dict | None = None
    survival: dict | None = None  # the shadow student's ACC/ASR (config.shadow_student)


@dataclass
class AttackContext:
    """The model being poisoned and everything a kind needs to train it."""

    model: nn.Module
    taps: tuple[TapPoint, ...]
    data: ImageData
    config: AttackConfig
    generator: torch.Generator
    device: torch.device
    progress: ProgressFn
    from_scratch: bool  # no clean model was trained or given first (BadNets/Blend poisoned from scratch)
    adv: ExtraLoss | None = field(default=None)
    # (teacher, teacher arch, data, student arch, seed, epochs, method) -> a student; given by jobs.attack
    distill_student: Callable | None = field(default=None)

    @property
    def target(self) -> int:
        return self.config.target

    @property
    def recipe(self) -> ClassifierRecipe:
        """The poisoning recipe: from scratch, or the fine-tuning of a clean model."""
        return self.config.scratch_recipe if self.from_scratch else self.config.finetune_recipe

    def distill(
        self, teacher: nn.Module, data: ImageData, arch: str, seed: int, epochs: int, method: str
    ) -> nn.Module:
        """Gives back a fresh `arch` student distilled by `method` from `teacher` on `data`, in eval mode,
        through the distiller the caller handed the kit (distillation sits above the kit); the teacher is
        frozen while it teaches and gets its own flags back after."""
        if self.distill_student is None:
            raise UsageError(
                "shadow and check students need a distiller: run the attack through rkdtool.jobs.attack"
            )
        with frozen(teacher):
            student = self.distill_student(teacher, self.config.arch, data, arch, seed, epochs, method)
        return student.eval()

    def trigger_steps(self, default: int) -> int:
        return self.config.trigger_steps or default

    def fit(
        self, transform: BatchTransform | None, extra: ExtraLoss | None, recipe: ClassifierRecipe, task: str
    ) -> None:
        """Trains `model` in place: CE on (possibly poisoned) batches + `extra` + adversarial training."""
        adv = self.adv

        def loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            total = x.new_zeros(())
            if extra is not None:
                total = total + extra(net, x, y)
            if adv is not None:
                total = total + adv(net, x, y)
            return total

        train_classifier(
            self.model,
            self.data,
            recipe,
            generator=self.generator,
            device=self.device,
            transform=transform,
            extra_loss=loss,
            progress=self.progress,
            task=task,
        )

    def triggered_subset(self, x: torch.Tensor, y: torch.Tensor, probe: Probe):
        """Gives back (normalised triggered copies, row indices) of a quarter of the batch's non-target
        images, or None.

        Attack terms run on [clean batch; triggered images] and read the triggered rows: on a triggered-only
        batch, train-mode BN would subtract the trigger's common shift and the term would shape a model that
        is never evaluated (eval-mode BN here instead made the terms unstable).
        """
        data = self.data
        keep = (y != self.target).nonzero().flatten()
        if len(keep) == 0:
            return None
        pick = keep[
            torch.randperm(len(keep), generator=self.generator)[: max(1, len(keep) // 4)].to(keep.device)
        ]
        return normalize(probe.apply(denormalize(x[pick], data.mean, data.std)), data.mean, data.std), pick


def adversarial_term(data: ImageData, eps: float) -> ExtraLoss:
    """Gives back the adversarial-training term (CE on PGD examples) for `--adv-train`."""
    return lambda net, x, y: pgd_loss(net, x, y, data, eps)
