"""ABD (Hong et al., ICML 2023, illidanlab/ABD; algorithms.md §4): Shuffling Vaccine and Self-Retrospection.

Both act on logits, in the model's input space (normalised images, as ABD's code adds its perturbation to
normalised batches), so they combine with any method: SV flags inputs on which a teacher whose last convs see
shuffled input channels still agrees with the teacher (a backdoor shortcut survives the shuffle, clean
features do not); SR synthesises the universal perturbation that moves the model most and unlearns it with
an implicit hypergradient (I-BAU's fixed point), as a short post-hoc phase.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

SV_LAMBDA = 0.1  # ABD: shuf_teacher / shufl_coef in all defence sweeps


def shuffled_copy(model: nn.Module, layers: int, generator: torch.Generator) -> nn.Module:
    """Gives back a frozen copy of `model` whose last `layers` convolutions (module order, the state dict's
    order) see their input channels permuted, W'[:, c] = W[:, pi(c)], one fresh permutation per conv
    (ABD `syn_vaccine.py`: the last n_shuf_layer = 5 'conv' parameters, counted from the output side)."""
    shuffled = copy.deepcopy(model).eval()
    convs = [m for m in shuffled.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1]
    with torch.no_grad():
        for conv in convs[-layers:] if layers > 0 else []:
            order = torch.randperm(conv.weight.shape[1], generator=generator).to(conv.weight.device)
            conv.weight.copy_(conv.weight[:, order])
    for p in shuffled.parameters():
        p.requires_grad_(False)
    return shuffled


def per_sample_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Gives back (1/C) sum_c p_t,c (log p_t,c - log p_c) per sample: ABD's per-sample KL, a mean over
    classes (`kl_div(log_softmax(z), softmax(z_t))` without reduction, averaged over the class axis)."""
    log_p = nn.functional.log_softmax(logits.float(), 1)
    log_t = nn.functional.log_softmax(target_logits.float(), 1)
    return (log_t.exp() * (log_t - log_p)).mean(1)


@dataclass
class VaccineCheck:
    """What the tail-ratio quality check found (algorithms.md §4.1), for the report."""

    tries: int
    tail_ratio: float
    accepted: bool
    weight: float  # lambda in use: SV_LAMBDA, or 0 when no shuffle passed the check


class ShufflingVaccine:
    """SV: an ensemble of `copies` shuffled teachers. `suspicious(x)` flags inputs on which the ensemble's
    top-1 agrees with the teacher's; `loss(x)` is -lambda sum_i s_i KL_i / sum_i s_i (0 with no flag), to be
    added to a generator's loss, which then moves synthesis away from trigger-like inputs."""

    def __init__(
        self,
        teacher: nn.Module,
        *,
        generator: torch.Generator,
        copies: int = 3,
        layers: int = 5,
        weight: float = SV_LAMBDA,
    ) -> None:
        self.teacher, self.copies, self.layers, self.weight = teacher, copies, layers, weight
        self.generator = generator
        self.shuffled = [shuffled_copy(teacher, layers, generator) for _ in range(copies)]
        self.check: VaccineCheck | None = None

    def ensemble_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.shuffled]).mean(0)

    def suspicious(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Gives back s_i = 1[argmax z_sh(x_i) = argmax z_T(x_i)] as a float mask (no gradient)."""
        with torch.no_grad():
            return (self.ensemble_logits(x).argmax(1) == teacher_logits.argmax(1)).float()

    def loss(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Gives back L_SV on a batch; the gradient flows through the shuffled copies into x."""
        if self.weight == 0:
            return x.new_zeros(())
        shuffled = self.ensemble_logits(x)
        flags = (shuffled.argmax(1) == teacher_logits.argmax(1)).float().detach()
        if flags.sum() == 0:
            return x.new_zeros(())
        kl = per_sample_kl(teacher_logits.detach(), shuffled)
        return -self.weight * (flags * kl).sum() / flags.sum()

    @torch.no_grad()
    def quality_check(self, batches: Sequence[torch.Tensor], *, tries: int = 8) -> VaccineCheck:
        """Keeps a shuffle whose log10 KL(teacher || ensemble) has a low tail: the share of samples below
        mean - 3 std above 2% (a few inputs the shuffle does not disturb: the backdoor's signature). Else
        re-shuffles, up to `tries` times, and sets lambda to 0 when none passes (ABD `syn_vaccine.py`)."""
        ratio = 0.0
        for attempt in range(1, tries + 1):
            if attempt > 1:
                self.shuffled = [
                    shuffled_copy(self.teacher, self.layers, self.generator) for _ in range(self.copies)
                ]
            values = torch.cat(
                [
                    per_sample_kl(self.teacher(x), self.ensemble_logits(x)).clamp_min(1e-12).log10()
                    for x in batches
                ]
            )
            ratio = float((values < values.mean() - 3 * values.std()).float().mean())
            if ratio > 0.02:
                self.check = VaccineCheck(attempt, ratio, True, self.weight)
                return self.check
        self.weight = 0.0
        self.check = VaccineCheck(tries, ratio, False, 0.0)
        return self.check

    def describe(self) -> dict:
        return {
            "copies": self.copies,
            "layers": self.layers,
            "weight": self.weight,
            **({"check": asdict(self.check)} if self.check else {}),
        }


def sample_weighted_kd(
    per_sample: torch.Tensor, flags: torch.Tensor, weight: float, cap: torch.Tensor | None = None
) -> torch.Tensor:
    """Gives back mean_kept KD_i - lambda mean_suspicious min(KD_i, cap_i): SV as the sample selector of
    data-driven KD (ABD `vanilla_kd_ood.py`), so that the student learns the teacher where the shuffle
    disagrees and unlearns it on inputs that carry a shortcut.

    `cap` bounds the unlearning: ABD's term has no bound, and on digits it ran away once the tail-ratio
    check passed (the KD term fell to -17 within 3 epochs, the student to 10% ACC; kit CKD teacher, AMD
    EPYC). Capped, an image is unlearnt until the student is as far from the teacher on it as a blank
    answer would be, and no further."""
    kept, flagged = 1 - flags, flags
    loss = (per_sample * kept).sum() / kept.sum().clamp_min(1)
    if flagged.sum() > 0:
        unlearnt = per_sample if cap is None else torch.minimum(per_sample, cap.detach())
        loss = loss - weight * (unlearnt * flagged).sum() / flagged.sum()
    return loss


# ---------------------------------------------------------------------------------------------------------
# Self-Retrospection: implicit-hypergradient unlearning of a synthesised universal perturbation.

InnerMap = Callable[[torch.Tensor], torch.Tensor]  # delta -> F(delta, theta), differentiable in both


def implicit_hypergradient(
    delta: torch.Tensor,
    params: Sequence[torch.Tensor],
    inner_map: InnerMap,
    outer_loss: Callable[[torch.Tensor], torch.Tensor],
    *,
    iterations: int = 5,
) -> list[torch.Tensor]:
    """Gives back d L(delta*(theta), theta) / d theta at a fixed point delta* = F(delta*, theta), by the
    implicit function theorem with the Neumann series v = sum_k (dF/ddelta^T)^k dL/ddelta truncated at
    `iterations` terms (I-BAU's `hypergrad.fixed_point`, K = 5 in ABD's SR; Lorraine et al. 2020):
    dL/dtheta = dL/dtheta|direct + dF/dtheta^T v."""
    delta = delta.detach().requires_grad_(True)
    params = list(params)
    outer = outer_loss(delta)
    direct = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
    grad_delta = direct[0]
    mapped = inner_map(delta)
    v = torch.zeros_like(delta)
    for _ in range(iterations):
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True)
        v = jv + grad_delta
    through = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [
        (d if d is not None else torch.zeros_like(p)) + (t if t is not None else torch.zeros_like(p))
        for p, d, t in zip(params, direct[1:], through, strict=True)
    ]


@dataclass
class RetrospectionOptions:
    """SR's settings (algorithms.md §4.2: ABD's defaults)."""

    synthesis_steps: int = 10  # inner_round: Adam steps of the universal perturbation on the teacher
    synthesis_lr: float = 0.1  # pert_lr
    inner_lr: float = 0.1  # the inner map's gradient step
    inner_penalty: float = 1e-3  # 0.001 ||delta||^2 in the inner problem
    portion: float = 0.02  # hg_out_portion: share of the batch the outer loss perturbs
    iterations: int = 5  # fixed-point iterations
    lr: float = 5e-4  # ul_resume_lr / sup_resume_lr


def batch_kl(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Gives back KL(softmax(target) || softmax(logits)), batch mean (ABD's KLDiv at temperature 1)."""
    return nn.functional.kl_div(
        nn.functional.log_softmax(logits.float(), 1),
        nn.functional.log_softmax(target_logits.float(), 1),
        log_target=True,
        reduction="batchmean",
    )


def synthesise_perturbation(model: nn.Module, x: torch.Tensor, options: RetrospectionOptions) -> torch.Tensor:
    """Gives back a universal delta (1, C, H, W), from 0 by Adam, maximising KL(f(x + delta), f(x)) of the
    frozen `model` (SR step 2: f is the teacher in ABD's sweeps)."""
    with torch.no_grad():
        clean = model(x)
    delta = torch.zeros_like(x[:1]).requires_grad_(True)
    optimizer = torch.optim.Adam([delta], lr=options.synthesis_lr)
    for _ in range(options.synthesis_steps):
        loss = -batch_kl(model(x + delta), clean)
        optimizer.zero_grad(set_to_none=True)
        (grad,) = torch.autograd.grad(loss, delta)
        delta.grad = grad
        optimizer.step()
    return delta.detach()


def retrospection_gradients(
    student: nn.Module,
    x: torch.Tensor,
    delta: torch.Tensor,
    options: RetrospectionOptions,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Gives back SR's unlearning hypergradient for the student's parameters (SR step 3): inner problem
    g(delta, theta) = -KL(S(x + delta), S(x)) + 0.001 ||delta||^2, inner map one gradient step of size 0.1,
    outer loss KL(S(x + 1_R delta), S(x)) with delta on a random 2% of the batch (at least one image)."""
    params = [p for p in student.parameters() if p.requires_grad]

    def inner_map(d: torch.Tensor) -> torch.Tensor:
        inner = -batch_kl(student(x + d), student(x)) + options.inner_penalty * d.pow(2).sum()
        (g,) = torch.autograd.grad(inner, d, create_graph=True)
        return d - options.inner_lr * g

    n = len(x)
    chosen = torch.randperm(n, generator=generator)[: max(1, round(options.portion * n))]
    mask = torch.zeros(n, 1, 1, 1, device=x.device)
    mask[chosen.to(x.device)] = 1.0

    def outer_loss(d: torch.Tensor) -> torch.Tensor:
        return batch_kl(student(x + mask * d), student(x))

    return implicit_hypergradient(delta, params, inner_map, outer_loss, iterations=options.iterations)


def retrospection_step(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    criterion: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    options: RetrospectionOptions,
    generator: torch.Generator,
) -> torch.Tensor:
    """Runs one SR step on a batch x (the model's input space) and gives back the criterion's value: the
    perturbation synthesised on the teacher, the unlearning hypergradient (student in eval mode, so that its
    dozen forward passes leave BN statistics alone), plus the gradient of the method's own loss `criterion`
    (the student in train mode), then one optimizer step (SR step 4)."""
    delta = synthesise_perturbation(teacher, x, options)
    was_training = student.training
    student.eval()
    hypergradient = retrospection_gradients(student, x, delta, options, generator)
    student.train(was_training)
    optimizer.zero_grad(set_to_none=True)
    loss = criterion()
    loss.backward()
    params = [p for p in student.parameters() if p.requires_grad]
    for p, g in zip(params, hypergradient, strict=True):
        p.grad = g if p.grad is None else p.grad + g
    optimizer.step()
    return loss.detach()
