"""The kit's distillation-aware triggers: kept inside the clean images' span, shaped on shadow students."""

from __future__ import annotations

import pytest
import torch

from rkdtool.attacks.ckd import optimise_toxic_trigger, toxic_neurons
from rkdtool.attacks.span import image_span
from rkdtool.data import load_dataset
from rkdtool.errors import UsageError
from rkdtool.models import build_model, parse_arch


def test_digits_span_holds_its_images_and_not_a_random_pattern():
    data = load_dataset("digits")
    span = image_span(data)
    # grey, bilinear from 8x8: at most 64 directions, whatever the 3,072 pixels
    assert 20 <= span.dimensions <= 64
    test = data.test_images[:100]  # not used to fit the span
    residual = (span.project(test) - test).flatten(1).norm(dim=1) / (test - span.mean).flatten(1).norm(dim=1)
    assert residual.mean() < 0.02 and residual.max() < 0.15  # measured: 0.005 and 0.075
    assert torch.allclose(span.project(span.project(test)), span.project(test), atol=1e-4)
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    centred = noise - span.mean
    residual = (span.project(noise) - noise).norm() / centred.norm()
    assert residual > 0.6  # most of a random pattern lies outside the span (measured: 0.75)


def test_in_span_toxic_trigger_is_a_blend_at_the_budget_inside_the_span():
    data = load_dataset("digits").subset(train=128, test=16)
    span = image_span(load_dataset("digits"))
    torch.manual_seed(0)
    model = build_model("wrn10-1", 10)
    taps = parse_arch("wrn10-1").taps
    toxic = toxic_neurons(model, taps, data, torch.device("cpu"))
    kwargs = {"steps": 3, "generator": torch.Generator().manual_seed(0), "device": torch.device("cpu")}
    pattern, mask = optimise_toxic_trigger(model, taps, data, toxic, mask_max=0.2, span=span, **kwargs)
    assert torch.all(mask == 0.2) and mask.shape == (1, 32, 32)
    assert pattern.min() >= 0 and pattern.max() <= 1
    # inside the span up to the [0, 1] clamp, unlike the free trigger
    assert (span.project(pattern) - pattern).norm() < 0.05 * (pattern - span.mean).norm()
    free, free_mask = optimise_toxic_trigger(model, taps, data, toxic, mask_max=0.2, **kwargs)
    assert (span.project(free) - free).norm() > 0.5 * (free - span.mean).norm()
    assert free_mask.max() <= 0.2 and not torch.all(free_mask == 0.2)


def test_shadow_students_shape_the_trigger_and_record_what_the_attacker_measured():
    from rkdtool.attacks.context import AttackConfig
    from rkdtool.attacks.kit import make_attack

    small = {"train_subset": 96, "test_subset": 40, "epochs": 1, "finetune_epochs": 1, "trigger_steps": 2}
    from rkdtool.jobs.attack import shadow_student

    shadowed = AttackConfig(kind="ckd", trigger_span=True, shadow_student="wrn10-1", **small)
    on = make_attack(shadowed, distill_student=shadow_student)
    off = make_attack(AttackConfig(kind="ckd", trigger_span=True, **small))
    record = on.summary()["shadow_student"]
    assert record["arch"] == "wrn10-1" and len(record["rounds"]) == 2
    for r in record["rounds"]:
        assert len(r["students_asr_before"]) == len(r["students_asr_after"]) == 2
    assert 0 <= record["check_student_asr"] <= 1 and 0 <= record["clean_start_asr"] <= 1
    assert "shadow_student" not in off.summary()
    # same seed, same start: only the shadow rounds differ, and they moved the trigger
    (p_on,), (p_off,) = on.probes, off.probes
    assert (p_on.pattern - p_off.pattern).abs().max() > 1e-3
    assert torch.all(p_on.mask == 0.2) and 0 <= p_on.pattern.min() and p_on.pattern.max() <= 1


def test_ta_aware_shapes_its_trigger_on_fkd_and_robustkd_ta_shadow_students():
    """`--kind ta-aware` (issue 13): the shadow rounds take an FKD and a robustkd-ta student in turn, and
    the attacker checks a fresh student of each method at the end."""
    from rkdtool.attacks.context import AttackConfig
    from rkdtool.attacks.kit import make_attack
    from rkdtool.jobs.attack import shadow_student

    small = {"train_subset": 96, "test_subset": 40, "epochs": 1, "finetune_epochs": 1, "trigger_steps": 2}
    result = make_attack(AttackConfig(kind="ta-aware", **small), distill_student=shadow_student)
    record = result.summary()["shadow_student"]
    assert record["arch"] == "wrn10-1" and record["methods"] == ["fkd", "robustkd-ta"]
    assert [r["methods"] for r in record["rounds"]] == [["fkd", "robustkd-ta"]] * 2
    assert set(record["check_students"]) == {"fkd", "robustkd-ta"}
    assert record["check_student_asr"] == record["check_students"]["fkd"]["asr"]
    assert 0 <= record["clean_student_asr"] <= 1  # the control on a student of the clean start ran
    (probe,) = result.probes
    assert probe.name == "ta-aware-trigger" and torch.all(probe.mask == 0.5)  # an in-span blend above 0.2


def test_shadow_students_take_the_defenders_synth_budget_when_the_attacker_names_one(monkeypatch):
    """`--shadow-synth-budget`: the attacker who knows a defender's non-default budget distils its robustkd-ta
    shadows with it; unset, they take `rkdtool distill`'s default."""
    import rkdtool.distill.prepare as prepare
    from rkdtool.distill.config import DistillConfig
    from rkdtool.jobs.attack import shadow_student

    seen = []

    def capture(method, student, teacher, teacher_arch, arch, data, probes, config, **kwargs):
        seen.append(config.synth_budget)
        raise RuntimeError("stop")  # the config is all this test needs

    monkeypatch.setattr(prepare, "prepare_method", capture)
    data = load_dataset("digits").subset(train=32, test=8)
    teacher = build_model("wrn10-1", 10)
    for budget in (0.45, None):
        try:
            shadow_student(teacher, "wrn10-1", data, "wrn10-1", 0, 1, "robustkd-ta", synth_budget=budget)
        except RuntimeError:
            pass
    assert seen == [0.45, DistillConfig().synth_budget]


class _Constant(torch.nn.Module):
    """A stand-in check student that answers one class whatever the image (no parameters); -1: the target
    (class 0) on every other image and class 1 on the rest."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = torch.full((len(x),), self.label)
        if self.label == -1:
            labels = torch.arange(len(x)) % 2
        return torch.nn.functional.one_hot(labels, 10).float()


def _scripted_distiller(labels: list[int], calls: list[int]):
    """Gives back a distiller whose n-th check student answers `labels[n]` (0, the target: it carries)."""

    def distill(teacher, teacher_arch, data, arch, seed, epochs, method):
        calls.append(seed)
        assert (
            method == "fkd" and arch == "wrn10-1" and not any(p.requires_grad for p in teacher.parameters())
        )
        return _Constant(labels[len(calls) - 1])

    return distill


def test_carry_check_plants_again_with_the_next_seed_until_the_check_student_carries():
    """`--carry-check` (carry.py): attempt 0 is the run's own seed; its check student does not carry, so the
    kit plants again from scratch with seed 1000, whose student does; the teacher kept is exactly the one a
    plain run with seed 1000 makes."""
    from rkdtool.attacks.context import AttackConfig
    from rkdtool.attacks.kit import make_attack

    small = {"kind": "badnets", "epochs": 1}
    calls: list[int] = []
    result = make_attack(
        AttackConfig(carry_check=0.8, carry_attempts=4, **small),
        distill_student=_scripted_distiller([3, 0], calls),
    )
    carry = result.summary()["carry_check"]
    assert carry["passed"] and carry["chosen"] == 1 and carry["seed"] == 1000 and carry["goal"] == 0.8
    assert [a["seed"] for a in carry["attempts"]] == [0, 1000] and calls == [997, 1000 * 1000 + 997]
    assert [a["student_held_asr"] for a in carry["attempts"]] == [0.0, 1.0]
    assert result.summary()["seed"] == 0  # the run's own seed; the one kept is carry["seed"]
    plain = make_attack(AttackConfig(seed=1000, **small))
    kept_weights, plain_weights = result.model.state_dict(), plain.model.state_dict()
    for (name, kept), again in zip(kept_weights.items(), plain_weights.values(), strict=True):
        assert torch.equal(kept, again), name
    assert result.asr == plain.asr and result.acc == plain.acc


def test_carry_check_that_never_passes_keeps_the_best_planting_and_says_so():
    from rkdtool.attacks.context import AttackConfig
    from rkdtool.attacks.kit import make_attack
    from rkdtool.cli.attack import carry_line

    small = {"kind": "badnets", "epochs": 1, "train_subset": 96, "test_subset": 40}
    calls: list[int] = []
    config = AttackConfig(carry_check=0.8, carry_attempts=3, **small)
    result = make_attack(config, distill_student=_scripted_distiller([3, -1, 5], calls))
    carry = result.summary()["carry_check"]
    assert [a["seed"] for a in carry["attempts"]] == [0, 1000, 2000] and len(calls) == 3
    asr = [a["student_held_asr"] for a in carry["attempts"]]
    assert asr[0] == asr[2] == 0.0 and 0.4 < asr[1] < 0.6
    assert carry["passed"] is False and carry["chosen"] == 1 and carry["seed"] == 1000
    line = carry_line(carry)
    assert line.startswith("carry check not passed in 3 plantings") and "seed 1000" in line
    with pytest.raises(UsageError, match="needs a distiller"):
        make_attack(config)
