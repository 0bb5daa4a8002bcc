"""ABD's Shuffling Vaccine and Self-Retrospection (distill/abd.py), data-free ZSKT (distill/datafree.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from rkdtool.distill.abd import (
    RetrospectionOptions,
    ShufflingVaccine,
    implicit_hypergradient,
    per_sample_kl,
    retrospection_gradients,
    sample_weighted_kd,
    shuffled_copy,
)
from rkdtool.distill.config import DistillConfig, student_name, vaccinates
from rkdtool.distill.datafree import (
    DataFreeDistiller,
    DataFreeRecipe,
    ImageGenerator,
    attention_loss,
    class_imbalance,
    train_data_free,
)
from rkdtool.distill.losses import fkd_loss, fkd_loss_per_sample
from rkdtool.distill.methods import METHODS, MethodOptions
from rkdtool.models import FeatureTaps, build_model, parse_arch
from rkdtool.probes.uap import Perturbation


def test_shuffled_copy_permutes_input_channels_of_the_last_convs_only():
    model = build_model("wrn10-1", 10).eval()
    copy = shuffled_copy(model, 5, torch.Generator().manual_seed(0))
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.weight.shape[1] > 1]
    shuffled = dict(copy.named_modules())
    for k, (name, conv) in enumerate(convs):
        before, after = conv.weight, shuffled[name].weight
        if k < len(convs) - 5:
            assert torch.equal(before, after), name
            continue
        assert not torch.equal(before, after), name
        # the same input-channel slices, in another order: W'[:, c] = W[:, pi(c)]
        slices = {tuple(before[:, c].flatten().tolist()) for c in range(before.shape[1])}
        assert {tuple(after[:, c].flatten().tolist()) for c in range(after.shape[1])} == slices
    assert all(not p.requires_grad for p in copy.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the teacher itself is untouched


def test_vaccine_loss_is_zero_without_flags_and_negative_kl_with_them():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    vaccine = ShufflingVaccine(teacher, generator=torch.Generator().manual_seed(0), layers=0)
    x = torch.randn(8, 3, 2, 2)
    logits = teacher(x)
    # layers=0: the copies are the teacher, every input is flagged and every KL is zero
    assert torch.equal(vaccine.suspicious(x, logits), torch.ones(8))
    assert float(vaccine.loss(x, logits)) == pytest.approx(0.0, abs=1e-7)
    vaccine.shuffled = [nn.Sequential(nn.Flatten(), nn.Linear(12, 4)) for _ in range(3)]
    flags = vaccine.suspicious(x, logits)
    kl = per_sample_kl(logits, vaccine.ensemble_logits(x))
    expected = -0.1 * (flags * kl).sum() / flags.sum() if flags.sum() else torch.tensor(0.0)
    assert float(vaccine.loss(x, logits).detach()) == pytest.approx(
        float(expected.detach()), rel=1e-5, abs=1e-8
    )


def test_sample_weighted_kd_learns_kept_and_unlearns_flagged_inputs():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    flags = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert float(sample_weighted_kd(per_sample, flags, 0.1)) == pytest.approx(1.5 - 0.1 * 3.5)
    assert float(sample_weighted_kd(per_sample, torch.zeros(4), 0.1)) == pytest.approx(2.5)
    # capped: the flagged images' 3 and 4 count as at most 2.5 and 3, so unlearning cannot run away
    cap = torch.tensor([9.0, 9.0, 2.5, 3.0])
    assert float(sample_weighted_kd(per_sample, flags, 0.1, cap=cap)) == pytest.approx(1.5 - 0.1 * 2.75)


def test_quality_check_zeroes_the_weight_when_no_shuffle_shows_a_tail():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    vaccine = ShufflingVaccine(teacher, generator=torch.Generator().manual_seed(0), layers=0)
    check = vaccine.quality_check([torch.randn(16, 3, 2, 2)], tries=2)
    assert not check.accepted and check.tries == 2 and vaccine.weight == 0.0


def _quadratic_problem():
    """Inner g(d, w) = 0.5 d'Ad - d'Bw (minimiser d* = A^-1 B w), outer L = ||d - c||^2 + w'e."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 3, generator=gen)
    a = q @ q.T + torch.eye(3)
    b = torch.randn(3, 2, generator=gen)
    c, e = torch.randn(3, generator=gen), torch.randn(2, generator=gen)
    w = torch.randn(2, generator=gen, requires_grad=True)
    eta = 1.0 / float(torch.linalg.eigvalsh(a).max())
    return a, b, c, e, w, eta


def test_implicit_hypergradient_matches_the_closed_form():
    a, b, c, e, w, eta = _quadratic_problem()
    d_star = torch.linalg.solve(a, b @ w.detach())

    def inner_map(d):
        g = 0.5 * d @ a @ d - d @ (b @ w)
        (grad,) = torch.autograd.grad(g, d, create_graph=True)
        return d - eta * grad

    def outer(d):
        return (d - c).pow(2).sum() + w @ e

    (got,) = implicit_hypergradient(d_star, [w], inner_map, outer, iterations=2000)
    exact = b.T @ torch.linalg.solve(a, 2 * (d_star - c)) + e  # dL/dw = B'A^-1 dL/dd + e
    assert torch.allclose(got, exact, atol=1e-4)
    (truncated,) = implicit_hypergradient(d_star, [w], inner_map, outer, iterations=1)
    assert not torch.allclose(truncated, exact, atol=1e-3)  # one term of the series is not the answer


def test_implicit_hypergradient_matches_an_explicit_inner_loop_on_a_tiny_model():
    """SR's fixed point against differentiating through the inner optimisation itself, run to convergence
    (a tiny linear model; the inner problem strongly convex in the perturbation)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    x, y = torch.randn(5, 6), torch.randn(5, 3)
    params = list(model.parameters())

    def inner_map(d):
        g = (model(x + d) - y).pow(2).mean() + 0.5 * d.pow(2).sum()
        (grad,) = torch.autograd.grad(g, d, create_graph=True)
        return d - 0.2 * grad

    def outer(d):
        return model(x + d).pow(2).mean()

    d = torch.zeros(1, 6, requires_grad=True)
    for _ in range(400):  # unrolled: every step stays in the graph
        d = inner_map(d)
    explicit = torch.autograd.grad(outer(d), params)
    implicit = implicit_hypergradient(d.detach(), params, inner_map, outer, iterations=400)
    for want, got in zip(explicit, implicit, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_retrospection_gradients_reach_every_student_parameter(digits):
    torch.manual_seed(0)
    student = build_model("wrn10-1", 10).eval()
    x = digits.train_images[:16]
    delta = 0.1 * torch.randn(1, 3, 32, 32)
    grads = retrospection_gradients(
        student, x, delta, RetrospectionOptions(), torch.Generator().manual_seed(0)
    )
    assert len(grads) == len(list(student.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_attention_loss_is_zero_for_equal_maps_and_pools_a_larger_one():
    f = [torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)]
    assert float(attention_loss(f, f)) == pytest.approx(0.0, abs=1e-7)
    assert float(attention_loss([torch.randn(2, 4, 16, 16)], [torch.randn(2, 4, 8, 8)])) > 0


def test_generator_emits_image_shaped_batches():
    out = ImageGenerator(z_dim=10, size=32)(torch.randn(4, 10))
    assert out.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        ImageGenerator(size=30)


def test_data_free_training_never_reads_a_training_image(digits, tmp_path):
    """The training split is replaced by NaN: a student that read it would come out NaN."""
    data = replace(digits, train_images=torch.full_like(digits.train_images, float("nan")))
    torch.manual_seed(0)
    teacher, student = build_model("wrn10-1", 10).eval(), build_model("wrn10-1", 10)
    before = [p.detach().clone() for p in student.parameters()]
    taps = parse_arch("wrn10-1").taps
    vaccine = ShufflingVaccine(teacher, generator=torch.Generator().manual_seed(0))
    distiller = DataFreeDistiller(
        student, teacher, taps, taps, size=32, z_dim=16, vaccine=vaccine, balance=5.0
    )
    recipe = DataFreeRecipe(
        epochs=2, rounds_per_epoch=2, batch_size=8, student_steps=2, z_dim=16, retrospection_rounds=1
    )
    rows = []
    result = train_data_free(
        distiller,
        data,
        recipe,
        [],
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
        on_epoch=rows.append,
        checkpoint=tmp_path / "checkpoint.pt",
        retrospection=RetrospectionOptions(synthesis_steps=2),
    )
    assert [r["epoch"] for r in rows] == [1, 2]
    assert set(rows[0]["loss"]) == {"adversarial", "balance", "vaccine", "kd", "attention"}
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    assert 0.0 <= result["acc"] <= 1.0 and result["rounds"] == 4
    assert set(result["before_retrospection"]) == {"acc", "asr"}  # measured before SR's phase
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert torch.isnan(data.train_images).all()


def test_fkd_loss_per_sample_averages_to_fkd_loss():
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4, 8, 8), (6, 8, 4, 4), (6, 16, 2, 2)]
    student = [torch.randn(s, generator=g) for s in shapes]
    teacher = [torch.randn(s, generator=g) for s in shapes]
    margins = [-torch.rand(1, s[1], 1, 1, generator=g) for s in shapes]
    per_image = fkd_loss_per_sample(student, teacher, margins)
    assert per_image.shape == (6,)
    assert float(per_image.mean()) == pytest.approx(float(fkd_loss(student, teacher, margins)), rel=1e-5)
    assert not torch.allclose(per_image, per_image.mean().expand(6))  # each image has its own share


@pytest.mark.parametrize("method", ["fkd", "robustkd-ta"])
def test_abd_sv_turns_the_feature_term_of_flagged_images_into_unlearning(method):
    """A vaccine whose copies are the teacher (layers=0) flags every image: the feature term must become
    -lambda times the per-image FKD loss, each capped at a blank feature's (nothing kept, all unlearnt)."""
    torch.manual_seed(0)
    teacher, taps = build_model("wrn10-1", 10).eval(), parse_arch("wrn10-1").taps
    student = build_model("wrn10-1", 10).train()
    kwargs = {"pool": [Perturbation("linf1", 0.2, torch.full((3, 32, 32), 0.1))]} if method != "fkd" else {}
    options, mean, std = MethodOptions(), (0.5,) * 3, (0.25,) * 3
    vaccine = ShufflingVaccine(teacher, generator=torch.Generator().manual_seed(0), layers=0)
    distiller = METHODS[method](student, teacher, taps, taps, options, mean, std, vaccine=vaccine, **kwargs)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, weighted = distiller.step(images, torch.arange(4), torch.Generator().manual_seed(2))
    assert (int(distiller.flagged), distiller.seen) == (4, 4)
    assert float(weighted["feature"]) < 0
    if method != "fkd":
        return  # robustkd-ta's student sees clean and perturbed images in one batch: its BN mixes them
    with torch.no_grad(), FeatureTaps(student, taps) as tapper:
        _, feats = tapper.run((images - 0.5) / 0.25)
        projected = [c(f) for c, f in zip(distiller.connectors, feats, strict=True)]
        targets = distiller.teacher_features(images)
        per_image = fkd_loss_per_sample(projected, targets, distiller.margins)
        blank = fkd_loss_per_sample([torch.zeros_like(p) for p in projected], targets, distiller.margins)
    expected = -0.1 * torch.minimum(per_image, blank).mean()
    assert float(weighted["feature"]) == pytest.approx(float(expected), rel=1e-4)


def test_abd_pieces_name_the_student_but_never_the_fkd_baseline():
    config = DistillConfig(method="robustkd-ta", abd_sv=True, abd_sr=True)
    assert student_name("robustkd-ta", config) == "robustkd-ta+sv+sr"
    assert student_name("fkd", config) == "fkd"
    assert student_name("fkd", replace(config, method="fkd")) == "fkd+sv+sr"
    assert student_name("abd", replace(config, method="abd")) == "abd"
    assert not vaccinates("kd", replace(config, method="kd"))


def test_class_imbalance_is_zero_for_even_use_and_log_c_for_one_class():
    even = torch.eye(4).repeat(2, 1) * 30  # 8 confident images, two of each class
    one = torch.zeros(8, 4)
    one[:, 2] = 30
    assert float(class_imbalance(even)) == pytest.approx(0.0, abs=1e-6)
    assert float(class_imbalance(one)) == pytest.approx(math.log(4), abs=1e-4)
