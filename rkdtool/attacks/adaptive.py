"""The adaptive attacker of the RobustKD paper (Table 7): CKD's toxic-neuron backdoor plus a term that keeps
the last stage's feature variance low on triggered images, against RobustKD's variance-based detoxification.
"""

from __future__ import annotations

from rkdtool.attacks import ckd
from rkdtool.attacks.context import AttackContext, Planted


def plant(ctx: AttackContext) -> Planted:
    """`rkdtool attack --kind adaptive`: CKD with `variance_weight` x the low-variance term."""
    return ckd.plant(ctx, variance_weight=ctx.config.variance_weight, name="adaptive")
