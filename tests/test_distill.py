"""Tests for rkdtool.distill: FKD losses, detox masks, methods and the trainer (small and real)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch import nn

from rkdtool.data import normalize
from rkdtool.distill.abd import ShufflingVaccine
from rkdtool.distill.losses import connector, fkd_loss, fkd_margin, kd_loss, partial_l2
from rkdtool.distill.methods import METHODS, MethodOptions
from rkdtool.distill.prepare import prepare_method
from rkdtool.distill.robustkd import (
    DetoxConfig,
    DetoxifiedTeacher,
    DetoxMasks,
    fit_detox_masks,
    loss_terms,
    mean_stage_outputs,
    per_sample_variance,
    select_stages,
)
from rkdtool.distill.trainer import StudentRecipe, train_student
from rkdtool.models import FeatureTaps, build_model, parse_arch
from rkdtool.probes.bank import probe_bank
from rkdtool.probes.spec import Probe
from rkdtool.probes.uap import Perturbation, apply_pool, perturbation_sink, synthesise_uap
from rkdtool.training import seed_everything, step_lr


def _bn(gamma: float, beta: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(1)
    with torch.no_grad():
        bn.weight.fill_(gamma)
        bn.bias.fill_(beta)
    return bn


def test_margin_is_the_truncated_normal_mean():
    # beta = 0, gamma = 1: E[x | x < 0] = -phi(0) / Phi(0) = -sqrt(2/pi)
    assert fkd_margin(_bn(1.0, 0.0)).item() == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-5)
    # negative gamma uses |gamma|
    assert fkd_margin(_bn(-2.0, 0.0)).item() == pytest.approx(-2 * math.sqrt(2 / math.pi), rel=1e-5)
    # Phi(-beta/s) <= 0.001: fallback -3s
    assert fkd_margin(_bn(1.0, 5.0)).item() == pytest.approx(-3.0)
    assert fkd_margin(_bn(1.0, 0.0)).shape == (1, 1, 1, 1)


def test_partial_l2_skips_student_below_nonpositive_teacher():
    teacher = torch.tensor([-1.0, -1.0, 2.0, 2.0])
    student = torch.tensor([-3.0, 0.5, 1.0, 4.0])
    # position 0: S <= T <= 0 -> skipped; 1: S > T -> 1.5^2; 2: T > 0 -> 1; 3: -> 4
    assert partial_l2(student, teacher).item() == pytest.approx(2.25 + 1 + 4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_partial_l2_gradients_match_autograd_of_the_written_formula(layout):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 6, 5, 5, generator=g).contiguous(memory_format=layout).requires_grad_()
    teacher = torch.randn(4, 6, 5, 5, generator=g).contiguous(memory_format=layout).requires_grad_()
    written = (((student > teacher) | (teacher > 0)).float() * (student - teacher) ** 2).sum()
    ds, dt = torch.autograd.grad(written, [student, teacher])
    fused = partial_l2(student, teacher)
    fs, ft = torch.autograd.grad(fused, [student, teacher])
    assert fused.item() == pytest.approx(written.item(), rel=1e-6)
    assert torch.equal(fs, ds) and torch.equal(ft, dt)  # to the bit: the trainer's path is unchanged
    assert fs.abs().sum() > 0 and (fs == 0).any()  # both branches of the mask occur


def test_fkd_loss_weights_layers_by_powers_of_two():
    ones = [torch.zeros(2, 1, 1, 1) for _ in range(3)]
    targets = [torch.ones(2, 1, 1, 1) for _ in range(3)]
    margins = [torch.full((1, 1, 1, 1), -1.0) for _ in range(3)]
    # each layer: sum over 2 samples of (0 - 1)^2 = 2; weights 1/4, 1/2, 1; / B / 1000
    assert fkd_loss(ones, targets, margins).item() == pytest.approx(2 * 1.75 / 2 / 1000)


def test_fkd_loss_clamps_teacher_at_its_margin():
    student = [torch.full((1, 1, 1, 1), -0.5)]
    teacher = [torch.full((1, 1, 1, 1), -5.0)]
    margin = [torch.full((1, 1, 1, 1), -1.0)]
    # target max(-5, -1) = -1; S = -0.5 > T -> (0.5)^2
    assert fkd_loss(student, teacher, margin).item() == pytest.approx(0.25 / 1000)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(4, 10)
    assert kd_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(logits, logits.flip(1), 4.0).item() > 0


def test_connector_maps_student_channels_to_teacher_channels():
    out = connector(16, 64)(torch.randn(2, 16, 8, 8))
    assert out.shape == (2, 64, 8, 8)


def test_detox_eq7_and_eq15_forms():
    masks = DetoxMasks({0: (1, 2, 2)}, tau=0.2, form="eq7")
    with torch.no_grad():
        masks.patterns["0"].fill_(10.0)
    f = torch.ones(3, 1, 2, 2)
    assert torch.allclose(masks.rewrite(0, f), torch.full_like(f, 0.8 * 1 + 0.2 * 10))
    assert masks.rewrite(1, f) is f  # stage not detoxified
    additive = DetoxMasks({0: (1, 2, 2)}, tau=0.2, form="eq15")
    with torch.no_grad():
        additive.patterns["0"].fill_(10.0)
    assert torch.allclose(additive.rewrite(0, f), torch.full_like(f, 1 + 0.2 * 10))
    with pytest.raises(ValueError):
        DetoxMasks({0: (1,)}, tau=0.1, form="eq9")


def test_detox_clamp_keeps_masks_in_range():
    masks = DetoxMasks({0: (4,)}, tau=0.1)
    with torch.no_grad():
        masks.masks["0"].copy_(torch.tensor([-1.0, 0.05, 0.3, 0.1]))
    masks.clamp_()
    assert masks.masks["0"].tolist() == pytest.approx([0.0, 0.05, 0.1, 0.1])
    stats = masks.statistics()["stage1"]
    assert stats["mask_at_tau"] == pytest.approx(0.5)
    assert stats["mask_at_zero"] == pytest.approx(0.25)


def test_select_stages():
    assert select_stages(3, "all") == [0, 1, 2]
    assert select_stages(3, "last") == [2]
    assert select_stages(3, "last2") == [1, 2]
    with pytest.raises(ValueError):
        select_stages(3, "first")


def test_detox_rewrite_is_chained_into_later_stages():
    torch.manual_seed(0)
    model = build_model("wrn10-1", 10).eval()
    taps = parse_arch("wrn10-1").taps
    x = torch.randn(2, 3, 32, 32)
    masks = DetoxMasks({0: (16, 32, 32)}, tau=0.5)  # only stage 1; P = 0 halves it
    with torch.no_grad(), FeatureTaps(model, taps) as plain:
        plain_logits, _ = plain.run(x)
        plain_stage2 = plain.stages[1].clone()
    with torch.no_grad():  # by hand, outside the hooks
        expected_stage1 = 0.5 * model.block1(model.conv1(x))
        expected_stage2 = model.block2(expected_stage1)
        expected_feature1 = model.block2.layer[0].bn1(expected_stage1)
    with torch.no_grad(), FeatureTaps(model, taps, rewrite=masks.rewrite) as detox:
        detox_logits, feats = detox.run(x)
    assert torch.allclose(detox.stages[0], expected_stage1, atol=1e-6)
    assert torch.allclose(detox.stages[1], expected_stage2, atol=1e-5)
    assert torch.allclose(feats[0], expected_feature1, atol=1e-5)
    assert not torch.allclose(detox.stages[1], plain_stage2)
    assert not torch.allclose(plain_logits, detox_logits)


def test_fit_detox_masks_init_and_constraints(digits):
    data = digits.subset(train=128, test=64)
    teacher = build_model("wrn10-1", 10).eval()
    taps = parse_arch("wrn10-1").taps
    gen = seed_everything(0)
    means = mean_stage_outputs(teacher, taps, data, torch.device("cpu"))
    masks = fit_detox_masks(
        teacher,
        taps,
        data,
        DetoxConfig(tau=0.1, epochs=1, lr=1e-2),
        generator=gen,
        device=torch.device("cpu"),
    )
    for k in range(3):
        m = masks.masks[str(k)].detach()
        assert m.shape == means[k].shape
        assert m.min() >= 0 and m.max() <= 0.1 + 1e-7
    # P starts at the mean clean feature and moves by Adam steps of at most ~lr each
    steps = 2  # 128 images / batch 64
    assert (masks.patterns["2"].detach() - means[2]).abs().max() <= steps * 1e-2 * 1.01
    assert all(p.requires_grad for p in teacher.parameters())  # the teacher is handed back unfrozen
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), FeatureTaps(teacher, taps) as plain, FeatureTaps(teacher, taps) as _:
        plain.run(x)
        before = per_sample_variance(plain.stages[2])
    with torch.no_grad():
        detoxified = DetoxifiedTeacher(teacher, taps, masks)
        detoxified(x)
        with FeatureTaps(teacher, taps, rewrite=masks.rewrite) as tapped:
            tapped.run(x)
            after = per_sample_variance(tapped.stages[2])
    assert after < before  # a blend toward a fixed pattern shrinks per-sample variance


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_step_trains_student_and_connectors_not_teacher(method, digits):
    torch.manual_seed(0)
    teacher, student = build_model("wrn10-1", 10), build_model("wrn10-1", 10)
    taps = parse_arch("wrn10-1").taps
    kwargs = {}
    if method.startswith("robustkd"):
        kwargs["detox"] = DetoxMasks({2: (64, 8, 8)}, tau=0.1)
    if method == "robustkd-ta":
        kwargs["pool"] = [Perturbation("linf1", 0.2, torch.full((3, 32, 32), 0.1))]
    if method == "abd":
        kwargs["vaccine"] = ShufflingVaccine(teacher, generator=torch.Generator().manual_seed(0))
    distiller = METHODS[method](
        student, teacher, taps, taps, MethodOptions(student_noise=0.1), digits.mean, digits.std, **kwargs
    )
    distiller.train()
    assert not teacher.training  # teacher BN pinned to eval by default
    images, labels = digits.train_images[:16], digits.train_labels[:16]
    logits, losses = distiller.step(images, labels, torch.Generator().manual_seed(0))
    assert logits.shape == (16, 10)
    expected = {
        "kd": {"ce", "kd"},
        "abd": {"ce", "kd"},
        "kdiga": {"ce", "kd"},
        "robustkd-ta": {"ce", "feature", "feature_triggered", "consistency"},
    }
    assert set(losses) == expected.get(method, {"ce", "feature"})
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    learnable = {id(p) for p in distiller.learnable_parameters()}
    assert not any(id(p) in learnable for p in teacher.parameters())
    if method not in ("kd", "kdiga", "abd"):
        assert all(id(p) in learnable for p in distiller.connectors.parameters())


def test_teacher_bn_train_option_puts_teacher_in_train_mode(digits):
    model = build_model("wrn10-1", 10)
    taps = parse_arch("wrn10-1").taps
    distiller = METHODS["fkd"](
        build_model("wrn10-1", 10),
        model,
        taps,
        taps,
        MethodOptions(teacher_bn="train"),
        digits.mean,
        digits.std,
    )
    distiller.train()
    assert model.training
    distiller.eval()
    assert not model.training


def test_step_lr_schedule():
    assert [step_lr(0.1, e, 8) for e in range(8)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


def test_train_student_learns_and_resumes_from_checkpoint(digits, tmp_path):
    data = digits.subset(train=400, test=120)
    teacher = build_model("wrn10-1", 10)
    taps = parse_arch("wrn10-1").taps
    probe = Probe("white-corner", "patch", 0, torch.ones(3, 32, 32), torch.zeros(1, 32, 32))
    rows = []

    def run(epochs: int, checkpoint) -> dict:
        gen = seed_everything(0)
        student = build_model("wrn10-1", 10)
        distiller = METHODS["fkd"](student, teacher, taps, taps, MethodOptions(), data.mean, data.std)
        return train_student(
            distiller,
            data,
            StudentRecipe(epochs=epochs),
            [probe],
            generator=gen,
            device=torch.device("cpu"),
            on_epoch=rows.append,
            checkpoint=checkpoint,
        )

    result = run(2, tmp_path / "checkpoint.pt")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["loss"]["ce"] < rows[0]["loss"]["ce"]  # it learns
    assert 0.0 <= result["acc"] <= 1.0
    assert result["asr"]["white-corner"] == 0.0  # an all-zero mask triggers nothing
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and not any(k.startswith("teacher.") for k in state["distiller"])
    rows.clear()
    run(3, tmp_path / "checkpoint.pt")  # resumes after epoch 2
    assert [r["epoch"] for r in rows] == [3]


def test_perturbations_apply_within_their_budget():
    images = torch.rand(4, 3, 32, 32)
    linf = Perturbation("linf1", 0.2, torch.full((3, 32, 32), 0.2))
    assert (linf.apply(images) - images).abs().max() <= 0.2 + 1e-6
    assert linf.apply(images).max() <= 1
    blend = Perturbation("blend1", 0.2, torch.ones(3, 32, 32))
    assert torch.allclose(blend.apply(images), 0.8 * images + 0.2)
    mixed = apply_pool([linf, blend], images, torch.Generator().manual_seed(0))
    assert mixed.shape == images.shape and not torch.equal(mixed, images)


def test_synthesised_perturbation_moves_a_trained_teachers_predictions(digits):
    from rkdtool.training import ClassifierRecipe, train_classifier

    data = digits.subset(train=300, test=100)
    gen = seed_everything(0)
    teacher = build_model("wrn10-1", 10)
    train_classifier(teacher, data, ClassifierRecipe(epochs=2), generator=gen, device=torch.device("cpu"))
    pert = synthesise_uap(
        teacher, data, kind="linf1", budget=0.2, epochs=1, generator=gen, device=torch.device("cpu")
    )
    assert pert.tensor.abs().max() <= 0.2 + 1e-6 and pert.tensor.shape == (3, 32, 32)
    sink = perturbation_sink(teacher, data, pert, torch.device("cpu"))
    assert 0 <= sink.dominant_class < 10 and 0 <= sink.share <= 1


def test_split_holdout_divides_the_training_split_only(digits):
    fit, held = digits.split_holdout(0.1, seed=3)
    n = len(digits.train_labels)
    assert len(held.train_labels) == round(0.1 * n) and len(fit.train_labels) + len(held.train_labels) == n
    assert torch.equal(fit.test_images, digits.test_images) and torch.equal(
        held.test_labels, digits.test_labels
    )

    def bag(*images):
        return Counter(tuple(x.flatten().tolist()) for part in images for x in part)

    assert bag(fit.train_images, held.train_images) == bag(digits.train_images)  # a partition


def test_detox_loss_terms_are_parsed_and_inv_needs_a_pool(digits):
    assert loss_terms("var+ce") == {"var", "ce"} and loss_terms("inv+ce") == {"inv", "ce"}
    for bad in ("", "var+", "variance", "ce+kl"):
        with pytest.raises(ValueError):
            loss_terms(bad)
    teacher, taps = build_model("wrn10-1", 10).eval(), parse_arch("wrn10-1").taps
    with pytest.raises(ValueError, match="pool"):
        fit_detox_masks(
            teacher,
            taps,
            digits.subset(train=64, test=16),
            DetoxConfig(loss="inv+ce", epochs=1),
            generator=seed_everything(0),
            device=torch.device("cpu"),
        )


def test_trigger_aware_masks_shrink_what_the_stand_in_changes(digits):
    """TAM: fitting on the invariance term alone lowers the last stage's change under the stand-in below
    where the masks start (M = tau, P = the mean clean feature)."""
    from tests.digits_model import trained_wrn10

    teacher, data = trained_wrn10()
    data = data.subset(train=128, test=32)
    taps = parse_arch("wrn10-1").taps
    lift = Perturbation("linf1", 0.2, torch.full((3, 32, 32), 0.15))

    def change(masks) -> float:
        x = data.train_images[:64]
        with torch.no_grad(), FeatureTaps(teacher, taps, rewrite=masks.rewrite) as tapper:
            tapper.run(normalize(torch.cat([x, lift.apply(x)]), data.mean, data.std))
            stage = tapper.stages[2]
            return float((stage[64:] - stage[:64]).pow(2).mean())

    def fit(epochs: int):
        return fit_detox_masks(
            teacher,
            taps,
            data,
            DetoxConfig(tau=0.5, loss="inv", epochs=epochs, lr=0.05),
            generator=seed_everything(0),
            device=torch.device("cpu"),
            pool=[lift],
        )

    assert change(fit(3)) < 0.8 * change(fit(0))
    teacher.eval()


def test_trigger_aware_student_refreshes_a_perturbation_against_itself(digits):
    teacher, student = build_model("wrn10-1", 10).eval(), build_model("wrn10-1", 10)
    taps = parse_arch("wrn10-1").taps
    pool = [Perturbation("linf1", 0.2, torch.full((3, 32, 32), 0.1))]
    distiller = METHODS["robustkd-ta"](
        student, teacher, taps, taps, MethodOptions(), digits.mean, digits.std, pool=pool, refresh_every=2,
        refresh_steps=2,
    )  # fmt: skip
    data, gen = digits.subset(train=128, test=16), torch.Generator().manual_seed(0)
    distiller.before_epoch(0, data, gen, torch.device("cpu"))
    distiller.before_epoch(1, data, gen, torch.device("cpu"))
    assert distiller.refreshed == []  # only every second epoch, never before the first
    distiller.before_epoch(2, data, gen, torch.device("cpu"))
    assert len(distiller.refreshed) == 1 and distiller.refreshed[0].tensor.abs().max() <= 0.2 + 1e-6
    assert all(p.requires_grad for p in student.parameters())  # handed back trainable


def test_trigger_aware_refresh_takes_its_own_kind_and_budget(digits):
    """--refresh-kind blend1 --refresh-budget 0.5 reach the distiller through prepare_method: the refreshed
    perturbation is a blend at 0.5 while the synthesised pool stays at --synth-budget."""
    from rkdtool.distill.config import DistillConfig

    teacher, student = build_model("wrn10-1", 10).eval(), build_model("wrn10-1", 10)
    data, gen = digits.subset(train=128, test=16), torch.Generator().manual_seed(0)
    config = DistillConfig(
        method="robustkd-ta", synth_epochs=1, synth_refresh=1, refresh_kind="blend1", refresh_budget=0.5,
        detox_epochs=1,
    )  # fmt: skip
    distiller, diagnostics, _ = prepare_method(
        "robustkd-ta", student, teacher, "wrn10-1", "wrn10-1", data, [], config, generator=gen,
        device=torch.device("cpu"),
    )  # fmt: skip
    info = diagnostics["synthesis"]
    assert (info["refresh_kind"], info["refresh_budget"], info["budget"]) == ("blend1", 0.5, 0.2)
    assert {p.budget for p in distiller.pool} == {0.2}
    distiller.before_epoch(1, data, gen, torch.device("cpu"))
    (refreshed,) = distiller.refreshed
    assert (refreshed.kind, refreshed.budget) == ("blend1", 0.5)
    mixed = refreshed.apply(torch.zeros(1, 3, 32, 32))
    assert torch.allclose(mixed, 0.5 * refreshed.tensor.unsqueeze(0))  # (1 - 0.5) * 0 + 0.5 * pattern


def test_tau_search_chooses_from_the_grid_with_synthesised_triggers_only(digits):
    from rkdtool.distill.config import DistillConfig
    from rkdtool.distill.prepare import search_tau
    from tests.digits_model import trained_wrn10

    teacher, data = trained_wrn10()
    data = data.subset(train=300, test=60)
    result = search_tau(
        "robustkd",
        teacher,
        "wrn10-1",
        "wrn10-1",
        data,
        DistillConfig(epochs=2, detox_epochs=1, synth_epochs=1),
        [],
        generator=seed_everything(0),
        device=torch.device("cpu"),
        grid=(0.05, 0.4),
    )
    teacher.eval()
    assert result["chosen"] in (0.05, 0.4) and [t["tau"] for t in result["trials"]] == [0.05, 0.4]
    assert result["held_out_images"] == 30 and result["proxy_epochs"] == 2
    for trial in result["trials"]:
        assert 0 <= trial["acc"] <= 1 and 0 <= trial["asr"] <= 1
        ok = result["teacher_acc_held_out"] - trial["acc"] <= 0.05 and trial["asr"] <= 0.10
        assert trial["accepted"] == ok
    accepted = [t for t in result["trials"] if t["accepted"]]
    best = max(
        accepted or result["trials"],
        key=(lambda t: t["acc"]) if accepted else (lambda t: t["acc"] - t["asr"]),
    )
    assert result["chosen"] == best["tau"]


def test_noise_control_is_fresh_bounded_noise():
    from rkdtool.probes.uap import RandomNoise

    images = torch.full((4, 3, 8, 8), 0.5)
    noise = RandomNoise(0.2)
    a, b = noise.apply(images), noise.apply(images)
    assert (a - images).abs().max() <= 0.2 + 1e-6 and not torch.equal(a, b)
    assert torch.equal(a[:, 0], a[:, 1])  # grey: one draw shared by the channels


def test_pool_sources_and_variant_labels(digits):
    from rkdtool.distill.config import DistillConfig, describe_variant
    from rkdtool.distill.prepare import synthesise_pool
    from rkdtool.errors import UsageError

    model = build_model("wrn10-1", 10).eval()
    config = DistillConfig(synth_pool="bank+noise")
    pool, info = synthesise_pool(
        model, digits, config, torch.Generator(), torch.device("cpu"), lambda *a: None
    )
    assert info["stand_ins"] == len(pool) == len(probe_bank()) + 1 and info["suspected_target"] is None
    with pytest.raises(UsageError, match="synth-pool"):
        synthesise_pool(model, digits, DistillConfig(synth_pool="uap+gan"), None, None, None)
    assert describe_variant(DistillConfig(method="fkd")) == "fkd"
    assert describe_variant(DistillConfig(method="robustkd")).startswith(
        "robustkd (paper-faithful RobustKD): detox eq7"
    )
    ta = describe_variant(DistillConfig(method="robustkd-ta", synth_refresh=2, tau_search=True))
    assert "trigger-consistency" in ta and "every 2 epoch" in ta and "Algorithm 1" in ta


@pytest.mark.parametrize("method", ["robustkd", "robustkd-ta"])
def test_robustkd_distills_from_the_detoxified_features(method, digits):
    """The masks given are the ones the step uses: the teacher targets equal the detoxified forward's taps
    and differ from the plain teacher's (a class-level `detox = None` once shadowed the submodule)."""
    torch.manual_seed(0)
    teacher, taps = build_model("wrn10-1", 10).eval(), parse_arch("wrn10-1").taps
    masks = DetoxMasks({2: (64, 8, 8)}, tau=0.5)
    with torch.no_grad():
        masks.patterns["2"].fill_(3.0)
    kwargs = {"pool": [Perturbation("linf1", 0.2, torch.zeros(3, 32, 32))]} if method == "robustkd-ta" else {}
    student = build_model("wrn10-1", 10)
    options = MethodOptions()
    distiller = METHODS[method](
        student, teacher, taps, taps, options, digits.mean, digits.std, detox=masks, **kwargs
    )
    assert distiller.detox is masks
    images = digits.train_images[:8]
    x = normalize(images, digits.mean, digits.std)
    with torch.no_grad(), FeatureTaps(teacher, taps, rewrite=masks.rewrite) as detoxed:
        _, want = detoxed.run(x)
    with torch.no_grad(), FeatureTaps(teacher, taps) as plain:
        _, raw = plain.run(x)
    got = distiller.teacher_features(images)
    assert torch.allclose(got[2], want[2]) and not torch.allclose(got[2], raw[2])


def _fkd(digits):
    torch.manual_seed(0)
    taps = parse_arch("wrn10-1").taps
    teacher = build_model("wrn10-1", 10).eval()
    return METHODS["fkd"](
        build_model("wrn10-1", 10), teacher, taps, taps, MethodOptions(), digits.mean, digits.std
    )


def test_eval_every_skips_the_test_pass_but_never_the_last_epoch(digits):
    data = digits.subset(train=64, test=32)
    rows = []
    recipe = StudentRecipe(epochs=3, batch_size=32, eval_every=2)
    result = train_student(
        _fkd(data),
        data,
        recipe,
        [],
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        on_epoch=rows.append,
    )
    assert [("acc" in r) for r in rows] == [False, True, True] and "acc" in result
    assert all(r["loss"] for r in rows)  # losses are logged every epoch
    with pytest.raises(ValueError, match="eval_every"):
        train_student(
            _fkd(data),
            data,
            StudentRecipe(epochs=1, eval_every=0),
            [],
            generator=torch.Generator(),
            device=torch.device("cpu"),
        )


def test_amp_trains_in_bf16_on_the_cpu_and_keeps_fp32_weights(digits, monkeypatch):
    from rkdtool.distill import trainer

    assert trainer.amp_dtype(torch.device("cpu"), True) == torch.bfloat16
    assert trainer.amp_dtype(torch.device("cpu"), False) is None
    seen = []
    real_step = trainer.train_step

    def spy(learner, optimizer, images, labels, generator, **kw):
        with torch.autocast("cpu", dtype=kw["dtype"] or torch.bfloat16, enabled=kw["dtype"] is not None):
            seen.append(learner.student(normalize(images, digits.mean, digits.std)).dtype)
        return real_step(learner, optimizer, images, labels, generator, **kw)

    monkeypatch.setattr(trainer, "train_step", spy)
    data = digits.subset(train=64, test=32)
    distiller = _fkd(data)
    before = [p.detach().clone() for p in distiller.student.parameters()]
    trainer.train_student(
        distiller,
        data,
        StudentRecipe(epochs=1, batch_size=32, amp=True),
        [],
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    assert seen and set(seen) == {torch.bfloat16}  # the forward ran in bf16
    after = list(distiller.student.parameters())
    assert all(p.dtype == torch.float32 for p in after)  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_channels_last_trains_in_nhwc_and_gives_the_student_back_in_nchw(digits):
    data = digits.subset(train=64, test=32)
    distiller = _fkd(data)
    conv = next(m for m in distiller.student.modules() if isinstance(m, torch.nn.Conv2d))
    seen = []  # (training?, input NHWC?, weight NHWC?) at each call of the student's first conv
    conv.register_forward_pre_hook(
        lambda m, inputs: seen.append(
            (
                m.training,
                inputs[0].is_contiguous(memory_format=torch.channels_last),
                m.weight.is_contiguous(memory_format=torch.channels_last),
            )
        )
    )
    train_student(
        distiller,
        data,
        StudentRecipe(epochs=1, batch_size=32, channels_last=True),
        [],
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )
    steps = [s for s in seen if s[0]]
    assert len(steps) == 2 and all(nhwc_in and nhwc_w for _, nhwc_in, nhwc_w in steps)
    convs = [p for p in distiller.student.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous() for p in convs)  # saved and exported as NCHW


def test_channels_last_defaults_on_for_the_cpu_only():
    from rkdtool.distill.trainer import default_channels_last

    assert default_channels_last(torch.device("cpu"))
    assert not default_channels_last(torch.device("cuda"))


def test_the_training_split_moves_to_an_accelerator_once_when_it_fits(digits):
    from rkdtool.distill.trainer import training_split

    images, labels = training_split(digits, torch.device("cpu"), 1024)
    assert images is digits.train_images  # the CPU keeps the host tensors
    meta = torch.device("meta")  # stands in for an accelerator: tensors move, no memory is used
    images, labels = training_split(digits, meta, 1024)
    assert images.device.type == "meta" and labels.device.type == "meta"
    images, _ = training_split(digits, meta, 1e-3)  # larger than the limit: stays on the host
    assert images.device.type == "cpu"


class _Tiny(nn.Module):
    """A smooth float64 classifier (tanh, no kinks) on 3x4x4 images, for exact finite differences."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1).double()
        self.fc = nn.Linear(64, 5).double()
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _iga_distiller(lam: float = 1.0):
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    return METHODS["kdiga"](_Tiny(1), _Tiny(2), (), (), MethodOptions(iga_lambda=lam), mean, std)


def _input_grad(model, x, y, mean, std):
    """d sum_b CE(model(x_b), y_b) / dx by central finite differences, element by element."""

    def loss(z):
        return nn.functional.cross_entropy(model(normalize(z, mean, std)), y, reduction="sum")

    grad = torch.zeros_like(x)
    flat, out = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + 1e-6
        up = loss(x).item()
        flat[i] = old - 1e-6
        down = loss(x).item()
        flat[i] = old
        out[i] = (up - down) / 2e-6
    return grad


def test_input_gradient_alignment_matches_finite_differences():
    d = _iga_distiller()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 4])
    with torch.no_grad():
        g_s = _input_grad(d.student, x.clone(), y, d.mean, d.std)
        g_t = _input_grad(d.teacher, x.clone(), y, d.mean, d.std)
    expected = (g_s - g_t).flatten(1).norm(dim=1).mean()
    assert float(d.input_gradient_alignment(x, y).detach()) == pytest.approx(float(expected), rel=1e-6)
    # Double backpropagation: the term's gradient in a student weight matches a finite difference of it.
    term = d.input_gradient_alignment(x, y)
    (w_grad,) = torch.autograd.grad(term, d.student.fc.weight)
    w = d.student.fc.weight.data
    old = w[2, 7].item()
    w[2, 7] = old + 1e-6
    up = float(d.input_gradient_alignment(x, y))
    w[2, 7] = old - 1e-6
    down = float(d.input_gradient_alignment(x, y))
    w[2, 7] = old
    assert float(w_grad[2, 7]) == pytest.approx((up - down) / 2e-6, rel=1e-5)
    assert abs(float(w_grad[2, 7])) > 1e-4  # a term that reaches the weights
    assert all(p.grad is None for p in d.teacher.parameters())


def test_iga_adds_a_named_loss_to_any_method_and_kdiga_is_kd_plus_iga():
    from rkdtool.distill.config import DistillConfig, describe_variant, iga_lambda

    d = _iga_distiller(0.5)
    x, y = torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.tensor([1, 2])
    _, losses = d(x, y, torch.Generator().manual_seed(0))
    assert set(losses) == {"ce", "kd", "iga"}
    assert float(losses["iga"]) == pytest.approx(0.5 * float(d.input_gradient_alignment(x, y)))
    _, plain = _iga_distiller(0.0)(x, y, torch.Generator().manual_seed(0))
    assert set(plain) == {"ce", "kd"}
    assert iga_lambda("kdiga", DistillConfig()) == 1.0 and iga_lambda("fkd", DistillConfig()) == 0.0
    assert iga_lambda("fkd", DistillConfig(iga_lambda=0.3)) == 0.3
    assert describe_variant(DistillConfig(method="kdiga")) == "kdiga + input-gradient alignment (lambda 1)"
    assert describe_variant(DistillConfig(method="robustkd-ta", iga_lambda=2)).endswith("(lambda 2)")


def test_halves_hand_a_channels_last_tensor_its_gradient_in_channels_last():
    from rkdtool.distill.methods import halves

    x = torch.randn(8, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = x * 1.0  # a non-leaf, as a connector's output is
    first, second = halves(y, 3)
    seen = []  # what reaches the layer that made y (after halves' own hook)
    y.register_hook(lambda g: seen.append(g.is_contiguous(memory_format=torch.channels_last)))
    assert first.shape[0] == 3 and second.shape[0] == 5
    (first.square().sum() + 2 * second.sum()).backward()
    assert seen == [True]  # a plain slice's backward hands it back in NCHW
    assert torch.allclose(x.grad[:3], 2 * x.detach()[:3]) and torch.all(x.grad[3:] == 2)


def test_frozen_freezes_parameters_and_gives_each_its_own_flag_back():
    from rkdtool.training import frozen

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[1].bias.requires_grad_(False)  # a flag that is already off stays off
    before = [p.requires_grad for p in net.parameters()]
    x = torch.ones(1, 2, requires_grad=True)
    with pytest.raises(RuntimeError), frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
        net(x).sum().backward()
        assert x.grad is not None and all(p.grad is None for p in net.parameters())  # the input learns
        raise RuntimeError("left early")
    assert [p.requires_grad for p in net.parameters()] == before == [True, True, True, False]
