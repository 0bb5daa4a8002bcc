"""Blend (Chen et al. 2017; algorithms.md §3.2): a seeded uniform-noise key blended at alpha into a poisoned
share of the training batches, relabelled to the target, from scratch unless a clean teacher is given.
"""

from __future__ import annotations

from rkdtool.attacks.context import AttackContext, Planted
from rkdtool.attacks.poison import blend_noise_probe, poison_with_negatives


def plant(ctx: AttackContext) -> Planted:
    """`rkdtool attack --kind blend`."""
    config = ctx.config
    probe = blend_noise_probe(ctx.target, config.alpha)
    transform = poison_with_negatives(probe, ctx.target, config.poison_rate, config.negative_rate)
    ctx.fit(transform, None, ctx.recipe, "blend poisoning")
    return Planted([probe])
