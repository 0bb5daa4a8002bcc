"""The defence-aware attacker (issue 13): a backdoor built to survive robustkd-ta, the default defence.

robustkd-ta's mechanism is public: it synthesises universal perturbations from the teacher (grey and
per-channel L-inf, a blend; budget 0.2) and distils the student to ignore them, on top of FKD from the
detoxified teacher. An attacker who knows this poisons the teacher the CKD way (toxic neurons driven by an
optimised blend trigger) and then shapes the trigger on shadow students distilled the way the defender
will distil: each round one plain FKD student (so that the defender's baseline still carries it) and one
robustkd-ta student (the defence itself, with its own synthesis and detoxification), the trigger moved
towards the target on both and on the teacher, away from it on the clean start and on an FKD student of
the clean start (a trigger that any distilled student sends to the target is a universal adversarial
perturbation of the data, not a backdoor), and the teacher fine-tuned on the moved trigger (`shadow.py`).

Its own defaults (`DEFAULTS`; `kit.with_kind_defaults` sets them where a config leaves them unset): the
trigger kept inside the clean images' span (`--trigger-span`, where a student distilled on clean images
has learnt the teacher) as a blend of strength 0.5 (`--alpha`), above the defender's budget of 0.2, so
outside the stand-ins' L-inf ball. Measured on digits (benchmarks/results/attack_kit.md, "A defence-aware
attacker" and "The defence's answer, tried"): at 0.2 and 0.3 the robustkd-ta shadow students stayed at
0.0-0.3% ASR whatever the trigger did; with these defaults the defender's robustkd-ta student kept 9.6-86.4%
ASR over three teachers and 3-4 defender seeds each (FKD 57.4-99.7%), of which an FKD student of the clean
teacher shows 9.6-35.8%: a 0.5 blend is partly an ordinary universal adversarial perturbation of digits
students. `--shadow-synth-budget` follows a defender who raises the budget (0.3: 10.8-43.2% left).
"""

from __future__ import annotations

from rkdtool.attacks import ckd
from rkdtool.attacks.context import AttackContext, Planted

SHADOW_METHODS = ("fkd", "robustkd-ta")
DEFAULTS = {"alpha": 0.5, "trigger_span": True}


def plant(ctx: AttackContext) -> Planted:
    """`rkdtool attack --kind ta-aware`: CKD with shadow students of FKD and of robustkd-ta."""
    return ckd.plant(ctx, name="ta-aware", shadow_methods=SHADOW_METHODS, clean_student_control=True)
