"""Distillation losses: Hinton KD and FKD (Heo et al., ICCV 2019; clovaai/overhaul-distillation)."""

from __future__ import annotations

import math

import torch
from torch import nn


def fkd_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Gives back FKD's per-channel margin (1, C, 1, 1) from a teacher BN's gamma and beta.

    m = E[x | x < 0] for x ~ N(beta, gamma^2): beta - s phi(beta/s) / Phi(-beta/s) with s = |gamma|,
    or -3s where Phi(-beta/s) <= 0.001 (overhaul-distillation `distiller.py::get_margin_from_BN`;
    algorithms.md §1.2).
    """
    s = bn.weight.detach().abs().double().clamp_min(1e-12)
    m = bn.bias.detach().double()
    normal = torch.distributions.Normal(0.0, 1.0)
    cdf = normal.cdf(-m / s)
    pdf = torch.exp(-0.5 * (m / s) ** 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 0.001, m - s * pdf / cdf.clamp_min(1e-12), -3 * s)
    return margin.float().view(1, -1, 1, 1)


def connector(student_channels: int, teacher_channels: int) -> nn.Sequential:
    """Gives back FKD's student transform: 1x1 conv (no bias) + BN, conv init N(0, sqrt(2 / C_t))."""
    conv = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))
    bn = nn.BatchNorm2d(teacher_channels)
    return nn.Sequential(conv, bn)


def _partial_l2_terms(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    mask = ((student > teacher) | (teacher > 0)).to(student.dtype)
    return (student - teacher) ** 2 * mask


class _PartialL2(torch.autograd.Function):
    """FKD's partial L2 in one pass each way: the forward keeps only the masked difference D, the backward
    is 2 g D (and -2 g D for the teacher). Autograd's graph of the same expression runs about nine
    elementwise passes over each feature map; the gradients are the same to the bit."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        diff = student - teacher
        masked = torch.where((diff > 0) | (teacher > 0), diff, 0.0)
        ctx.save_for_backward(masked)
        nhwc = masked.dim() == 4 and masked.is_contiguous(memory_format=torch.channels_last)
        flat = (masked.permute(0, 2, 3, 1) if nhwc else masked).reshape(-1)  # a view when contiguous
        return torch.dot(flat, flat)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (masked,) = ctx.saved_tensors
        scaled = masked * (2 * grad)
        return scaled, (-scaled if ctx.needs_input_grad[1] else None)


def partial_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Gives back sum 1[(S > T) or (T > 0)] (S - T)^2: FKD's partial L2 (algorithms.md §1.5)."""
    return _PartialL2.apply(student, teacher)


def _fkd_target(teacher: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """FKD's target: the teacher's pre-ReLU feature, raised to its channel's margin where below it."""
    return torch.max(teacher.detach(), margin.to(teacher.device, teacher.dtype))


def fkd_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], margins: list[torch.Tensor]
) -> torch.Tensor:
    """Gives back sum_k d_p(max(T_k, m_k), S_k) / 2^(n-k-1) / B / 1000 (algorithms.md §1.3-1.6)."""
    n = len(student_feats)
    batch = student_feats[0].shape[0]
    total = student_feats[0].new_zeros(())
    for k, (s, t, m) in enumerate(zip(student_feats, teacher_feats, margins, strict=True)):
        s, t = s.float(), t.float()  # under autocast the features are bf16/fp16; the sum is not
        total = total + partial_l2(s, _fkd_target(t, m)) / 2 ** (n - k - 1)
    return total / batch / 1000


def fkd_loss_per_sample(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor], margins: list[torch.Tensor]
) -> torch.Tensor:
    """Gives back `fkd_loss` split by image, shape (B,): its mean is `fkd_loss` (for ABD's sample
    re-weighting, which needs each image's share)."""
    n = len(student_feats)
    total = student_feats[0].new_zeros(student_feats[0].shape[0], dtype=torch.float32)
    for k, (s, t, m) in enumerate(zip(student_feats, teacher_feats, margins, strict=True)):
        terms = _partial_l2_terms(s.float(), _fkd_target(t.float(), m))
        total = total + terms.flatten(1).sum(1) / 2 ** (n - k - 1)
    return total / 1000


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gives back Hinton's soft-target term T^2 KL(softmax(z_t/T) || softmax(z_s/T)) (Hinton et al. 2015)."""
    log_p = nn.functional.log_softmax(student_logits.float() / temperature, dim=1)
    q = nn.functional.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return nn.functional.kl_div(log_p, q, reduction="batchmean") * temperature**2
