"""BadNets (Gu et al. 2017; algorithms.md §3.1): a 3x3 grid in the bottom-right corner, a poisoned share of
the training batches relabelled to the target, from scratch unless a clean teacher is given.
"""

from __future__ import annotations

from rkdtool.attacks.context import AttackContext, Planted
from rkdtool.attacks.poison import badnets_probe, poison_with_negatives


def plant(ctx: AttackContext) -> Planted:
    """`rkdtool attack --kind badnets`."""
    config = ctx.config
    probe = badnets_probe(ctx.target)
    transform = poison_with_negatives(probe, ctx.target, config.poison_rate, config.negative_rate)
    ctx.fit(transform, None, ctx.recipe, "badnets poisoning")
    return Planted([probe])
