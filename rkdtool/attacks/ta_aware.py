"""The defence-aware attacker (issue 13): a backdoor built to survive robustkd-ta, the default defence.

robustkd-ta's mechanism is public: it synthesises universal perturbations from the teacher (grey and
per-channel L-inf, a blend; budget 0.2) and distils the student to ignore them, on top of FKD from the
detoxified teacher. An attacker who knows this poisons the teacher the CKD way (toxic neurons driven by an
optimised blend trigger) and then shapes the trigger on shadow students distilled the way the defender
will distil: each round one plain FKD student (so that the defender's baseline still carries it) and one
robustkd-ta student (the defence itself, with its own synthesis and detoxification), the trigger moved
towards the target on both and on the teacher, away from it on the clean start, and the teacher
fine-tuned on the moved trigger (`shadow.py`). `--alpha` is the mask bound: the defender's budget is 0.2,
so a bound above it puts the trigger outside the stand-ins' L-inf ball.
"""

from __future__ import annotations

from rkdtool.attacks import ckd
from rkdtool.attacks.context import AttackContext, Planted

SHADOW_METHODS = ("fkd", "robustkd-ta")


def plant(ctx: AttackContext) -> Planted:
    """`rkdtool attack --kind ta-aware`: CKD with shadow students of FKD and of robustkd-ta."""
    return ckd.plant(ctx, name="ta-aware", shadow_methods=SHADOW_METHODS)
