"""Projected gradient descent in pixel space (Madry et al., ICLR 2018): adversarial examples for adversarial
training, and robust accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from rkdtool.data import ImageData, denormalize, normalize


def pgd_loss(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, data: ImageData, eps: float, steps: int = 3
) -> torch.Tensor:
    """Gives back CE on PGD-Linf examples (pixel space, step 2.5 eps / steps, random start; Madry et al.)."""
    pixels = denormalize(x, data.mean, data.std).detach()
    delta = (torch.rand_like(pixels) * 2 - 1) * eps
    was_training = net.training
    net.eval()
    for _ in range(steps):
        delta.requires_grad_(True)
        adv = normalize((pixels + delta).clamp(0, 1), data.mean, data.std)
        (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(adv), y), delta)
        delta = (delta + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps).detach()
    net.train(was_training)
    return nn.functional.cross_entropy(net(normalize((pixels + delta).clamp(0, 1), data.mean, data.std)), y)
