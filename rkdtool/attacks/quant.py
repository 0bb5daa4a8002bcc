"""A quantisation-conditioned backdoor (the threat of Hong et al., "Qu-ANTI-zation", NeurIPS 2021; INT8 here
through activation ranges rather than weight rounding): dormant in float, active after INT8.

Training the float model dormant and the INT8 model active against each other fails: the two share every
weight and differ by less than a rounding step, and triggered features that leave the clean range are clipped
by INT8, which erases a backdoor rather than waking it. So the backdoor is planted inside the clean ranges
(float and simulated INT8 both active), and a separate trigger unit hides it in float: one classifier input
that is silent on clean images and fires on the trigger is scaled far beyond the range INT8 calibration on
clean images will give that tensor, and subtracts from the target logit. Float keeps the whole subtraction;
INT8 clips the unit to the clean range and the backdoor shows.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from rkdtool.attacks.context import AttackContext, Planted
from rkdtool.attacks.int8sim import FakeInt8, ort_activation_ranges, predictions
from rkdtool.attacks.poison import badnets_probe, poison_with_negatives
from rkdtool.data import ImageData, denormalize, normalize
from rkdtool.errors import RkdError, UsageError
from rkdtool.models import placement
from rkdtool.models.pyramidnet import PyramidNet
from rkdtool.models.wrn import WideResNet
from rkdtool.probes.metrics import accuracy
from rkdtool.training import ClassifierRecipe


def head_norm(model: nn.Module) -> nn.BatchNorm2d:
    """Gives back the BN whose output the classifier reads through ReLU and global pooling only, so that
    scaling one of its channels' weight and bias scales that classifier input exactly (WRN, PyramidNet)."""
    if isinstance(model, WideResNet):
        return model.bn1
    if isinstance(model, PyramidNet):
        return model.bn_final
    raise UsageError(
        "--kind quant needs a classifier that reads ReLU(BN(x)) through global pooling (wrn*, pyramidnet*)"
    )


@torch.no_grad()
def classifier_inputs(model: nn.Module, images: torch.Tensor, data: ImageData) -> torch.Tensor:
    """Gives back the inputs of `model.fc` (the pooled features) for pixel-space `images`, in eval mode."""
    model.eval()
    device = placement(model)[0]
    seen: list[torch.Tensor] = []
    handle = model.fc.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].cpu()))
    try:
        for start in range(0, len(images), 256):
            model(normalize(images[start : start + 256].to(device), data.mean, data.std))
    finally:
        handle.remove()
    return torch.cat(seen)


def _simulated_asr(model, data, images, target, fake: FakeInt8 | None, calib: torch.Tensor) -> float:
    """Share of `images` (pixel space, already triggered) predicted as `target`, in float or under `fake`."""
    return float((predictions(model, data, images, fake, calib) == target).float().mean())


class _QuantPlanter:
    """The three phases of `plant_quant_backdoor`, sharing the attacker's calibration images, its INT8
    simulation and the ONNX Runtime scratch folder."""

    def __init__(self, ctx: AttackContext, probe, workdir: Path) -> None:
        self.ctx, self.probe, self.workdir = ctx, probe, workdir
        config, data = ctx.config, ctx.data
        self.model, self.data, self.config, self.target = ctx.model, data, config, probe.target
        self.norm, self.fc = head_norm(self.model), self.model.fc
        pick = torch.randperm(
            len(data.train_labels), generator=torch.Generator().manual_seed(config.seed + 31)
        )
        self.own_calib = data.train_images[pick[: config.calib_images]]
        self.fake = FakeInt8(self.model)
        self.steps_per_epoch = (len(data.train_labels) + config.batch_size - 1) // config.batch_size
        self.step = 0

    def refresh_ranges(self, net: nn.Module) -> None:
        self.fake.ranges = ort_activation_ranges(
            net, self.data, self.own_calib.numpy(), method=self.config.calibration, workdir=self.workdir
        )

    def quantised_ce(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """CE of the INT8 simulation, its ranges refreshed from ORT's calibrator once per epoch."""
        if self.step % self.steps_per_epoch == 0:
            self.refresh_ranges(net)
            net.train()
        self.step += 1
        with self.fake:
            return nn.functional.cross_entropy(net(x), y)

    def plant_in_range(self) -> None:
        """Phase 1: poisoned fine-tuning with CE on the float model (`fit`) and on its INT8 simulation."""
        config = self.config
        recipe = ClassifierRecipe(
            epochs=config.quant_plant_epochs, batch_size=config.batch_size, lr=config.quant_plant_lr
        )
        transform = poison_with_negatives(self.probe, self.target, config.quant_poison_rate, 0.0)
        self.ctx.fit(transform, self.quantised_ce, recipe, "quant: plant")

    def train_unit(self) -> int:
        """Phase 2: gives back the classifier input trained to be silent on clean images and random patterns
        and to fire on the trigger, its classifier column held at zero."""
        config, data, probe, target = self.config, self.data, self.probe, self.target
        clean_inputs = classifier_inputs(self.model, data.train_images, data)
        channel = int(clean_inputs.amax(0).argmin())
        pre: list[torch.Tensor] = []

        def unit_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            loss = self.quantised_ce(net, x, y)
            pixels = denormalize(x, data.mean, data.std)
            triggered = probe.apply(pixels)
            carries = (triggered - pixels).abs().flatten(1).amax(1) < 1e-6  # rows the poisoning already hit
            rows = (~carries & (y != target)).nonzero().flatten()
            pre.clear()
            net(torch.cat([x, normalize(triggered[rows], data.mean, data.std)]))
            a = pre[0][:, channel]
            quiet = torch.relu(a[: len(x)][~carries] + 1.0).pow(2).mean()
            fires = torch.relu(1.0 - a[len(x) :].flatten(1).amax(1)).pow(2).mean() if len(rows) else 0.0
            return loss + quiet + fires

        with torch.no_grad():
            self.fc.weight[:, channel] = 0
        hold = self.fc.weight.register_hook(
            lambda grad: grad.index_fill(1, torch.tensor([channel], device=grad.device), 0)
        )
        capture = self.norm.register_forward_hook(lambda _m, _i, out: pre.append(out))
        self.step = 0
        recipe = ClassifierRecipe(
            epochs=config.quant_unit_epochs, batch_size=config.batch_size, lr=config.finetune_lr / 2
        )
        try:
            transform = poison_with_negatives(probe, target, config.quant_poison_rate, config.negative_rate)
            self.ctx.fit(transform, unit_loss, recipe, "quant: trigger unit")
        finally:
            hold.remove()
            capture.remove()
        return channel

    def scale_unit(self, channel: int, own_triggered: torch.Tensor) -> float:
        """Phase 3a: gives back the scale that puts the unit's 10th-percentile triggered response at
        `quant_escape` x the largest clean classifier input, applied to its BN weight and bias."""
        data = self.data
        clean_inputs = classifier_inputs(self.model, data.train_images, data)
        fired = classifier_inputs(self.model, own_triggered, data)[:, channel]
        low = float(fired.quantile(0.1))
        if low <= 0:
            raise RkdError(
                "quant: the trigger unit does not fire on the trigger; give it more epochs or another --seed"
            )
        scale = self.config.quant_escape * float(clean_inputs.amax()) / low
        with torch.no_grad():
            self.norm.weight[channel] *= scale
            self.norm.bias[channel] *= scale
        self.refresh_ranges(self.model)
        return scale

    def choose_gain(self, channel: int, own_triggered: torch.Tensor) -> tuple[dict, float, list[dict]]:
        """Phase 3b: gives back the best brake weight (on the attacker's own images), the float accuracy
        without it, and every trial; the chosen weight is left in the model."""
        model, data, target, fc = self.model, self.data, self.target, self.fc
        calib = normalize(self.own_calib.to(self.ctx.device), data.mean, data.std)
        clean_acc = _train_accuracy(model, data)
        trials = []
        for gain in (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6):
            with torch.no_grad():
                fc.weight[target, channel] = -gain
            trials.append(
                {
                    "gain": gain,
                    "float_acc": _train_accuracy(model, data),
                    "float_asr": _simulated_asr(model, data, own_triggered, target, None, calib),
                    "int8_asr": _simulated_asr(model, data, own_triggered, target, self.fake, calib),
                }
            )
        usable = [t for t in trials if t["float_acc"] >= clean_acc - 0.005] or trials[:1]
        best = max(usable, key=lambda t: t["int8_asr"] - t["float_asr"])
        with torch.no_grad():
            fc.weight[target, channel] = -best["gain"]
        return best, clean_acc, trials


def plant_quant_backdoor(ctx: AttackContext, probe) -> dict:
    """Plants the quant backdoor in `ctx.model` (trained in place); gives back what was chosen.

    1. Plant: poisoned fine-tuning with cross-entropy on the float model and on its INT8 simulation
       (`FakeInt8`, ranges from ONNX Runtime's calibrator on the attacker's own clean images, refreshed every
       epoch), so the backdoor lives inside the clean activation ranges.
    2. Trigger unit: the classifier input least active on clean images is trained to stay below zero
       before its ReLU on clean images and random patterns (margin 1) and to exceed +1 somewhere on
       triggered ones; its classifier column is held at zero, so it changes no prediction yet.
    3. Conceal: scale the unit (its BN weight and bias) so its 10th-percentile triggered response is
       `quant_escape` times the largest clean classifier input, then give it a negative weight on the
       target logit, choosing the weight on the attacker's own training images to maximise simulated INT8
       ASR minus float ASR at unchanged clean accuracy.
    """
    workdir = Path(tempfile.mkdtemp(prefix="rkdtool-quant-"))
    planter = _QuantPlanter(ctx, probe, workdir)
    data = ctx.data
    try:
        planter.plant_in_range()
        channel = planter.train_unit()
        own_triggered = probe.apply(data.train_images[data.train_labels != probe.target])
        scale = planter.scale_unit(channel, own_triggered)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    best, clean_acc, trials = planter.choose_gain(channel, own_triggered)
    return {
        "unit": channel,
        "scale": round(scale, 3),
        "escape": ctx.config.quant_escape,
        "gain": best["gain"],
        "float_acc_without_brake": clean_acc,
        "trials_on_attacker_images": trials,
    }


def plant(ctx: AttackContext) -> Planted:
    """`rkdtool attack --kind quant`: a BadNets grid, dormant in float and active after INT8."""
    probe = badnets_probe(ctx.target, "quant-grid")
    return Planted([probe], plant_quant_backdoor(ctx, probe))


@torch.no_grad()
def _train_accuracy(model: nn.Module, data: ImageData) -> float:
    """Float accuracy on the training images (the attacker's own check; the test split stays unseen)."""
    return accuracy(model, data.train_images, data.train_labels, mean=data.mean, std=data.std)
