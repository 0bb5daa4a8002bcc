"""Neural Cleanse: anomaly index arithmetic, the optimisation, the budget path and the time estimate.

That it names a BadNets teacher's target and flags nothing on a clean teacher is tested with the attack
kit's teachers in tests/test_attacks_kit.py (slow).
"""

from __future__ import annotations

import math

import pytest
import torch
from digits_model import trained_wrn10

from rkdtool.errors import UsageError
from rkdtool.probes.reverse import (
    ReverseConfig,
    anomaly_indices,
    class_steps,
    estimate_seconds,
    reverse_engineer,
)
from rkdtool.probes.spec import load_probes, save_probes


def test_anomaly_index_is_median_distance_over_scaled_mad():
    norms = {0: 10.0, 1: 100.0, 2: 110.0, 3: 90.0, 4: 105.0, 5: 95.0}
    index = anomaly_indices(norms)
    median = 97.5  # of 10, 90, 95, 100, 105, 110
    mad = 1.4826 * 7.5  # median of |x - 97.5| = 87.5, 7.5, 2.5, 2.5, 7.5, 12.5 -> 7.5
    assert index[0] == pytest.approx((median - 10) / mad)
    assert index[2] == pytest.approx((median - 110) / mad) and index[2] < 0  # larger masks go negative
    assert max(index, key=index.get) == 0


# Mask norms measured on this CPU (150 steps per class, WRN-16-1 teachers of the attack kit on digits).
BADNETS_NORMS = {0: 4.8, 1: 104.1, 2: 36.2, 3: 58.2, 4: 37.8, 5: 62.7, 6: 83.0, 7: 58.1, 8: 101.0, 9: 91.1}
CLEAN_NORMS = {0: 103.6, 1: 170.1, 2: 133.9, 3: 71.1, 4: 128.2, 5: 77.0, 6: 123.4, 7: 81.4, 8: 82.9, 9: 103.1}


def test_log_scale_index_is_the_linear_index_of_the_log_norms():
    logs = {c: math.log(v) for c, v in BADNETS_NORMS.items()}
    assert anomaly_indices(BADNETS_NORMS, scale="log") == pytest.approx(anomaly_indices(logs))


def test_log_scale_flags_a_backdoor_target_that_the_spread_of_clean_classes_hides_on_the_linear_scale():
    linear, log = anomaly_indices(BADNETS_NORMS), anomaly_indices(BADNETS_NORMS, scale="log")
    assert linear[0] < 2 < log[0]  # 12x smaller than the median, yet 1.6 on the linear scale
    assert max(log, key=log.get) == 0 and sorted(log.values())[-2] < 1
    assert max(anomaly_indices(CLEAN_NORMS, scale="log").values()) < 2


def test_unknown_anomaly_scale_is_a_usage_error_before_any_optimisation():
    with pytest.raises(UsageError, match="anomaly scale"):
        reverse_engineer(
            torch.nn.Identity(),
            torch.zeros(2, 3, 32, 32),
            torch.zeros(2, dtype=torch.long),
            num_classes=2,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            config=ReverseConfig(scale="sqrt"),
        )


@pytest.fixture(scope="module")
def trained():
    return trained_wrn10()


def test_reverse_engineering_gives_masks_probes_and_leaves_the_model_alone(trained, tmp_path):
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ReverseConfig(steps=12, batch_size=8, classes=[1, 4, 7], threshold=0.5)
    result = reverse_engineer(
        model,
        data.train_images,
        data.train_labels,
        num_classes=10,
        mean=data.mean,
        std=data.std,
        config=config,
    )
    assert result.statistic == "full" and result.candidates == [1, 4, 7]
    assert sorted(result.norms) == [1, 4, 7] and sorted(result.anomaly_index) == [1, 4, 7]
    for cls, trig in result.triggers.items():
        assert trig.target == cls and trig.refined
        assert trig.mask.shape == (1, 32, 32) and trig.pattern.shape == (3, 32, 32)
        assert 0 <= float(trig.mask.min()) and float(trig.mask.max()) <= 1
        assert trig.l1 == pytest.approx(float(trig.mask.sum()), rel=1e-4)
        assert result.norms[cls] == pytest.approx(trig.l1)
    assert result.flagged == sorted(
        [c for c, v in result.anomaly_index.items() if v > 0.5], key=lambda c: -result.anomaly_index[c]
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    probes = result.probes([4, 7])
    assert [p.target for p in probes] == [4, 7] and probes[0].kind == "image-mask"
    reloaded = load_probes(save_probes(probes, tmp_path))
    assert torch.allclose(reloaded[1].apply(data.test_images[:4]), probes[1].apply(data.test_images[:4]))
    doc = result.to_json()
    assert set(doc) >= {"anomaly_index", "flagged", "norms", "candidates", "seconds"}


def test_class_limit_screens_every_class_then_refines_the_smallest(trained):
    model, data = trained
    config = ReverseConfig(steps=4, screen_steps=3, batch_size=8, classes=2)
    result = reverse_engineer(
        model,
        data.train_images,
        data.train_labels,
        num_classes=10,
        mean=data.mean,
        std=data.std,
        config=config,
    )
    assert result.statistic == "screen" and len(result.norms) == 10
    smallest = sorted(result.norms, key=result.norms.get)[:2]
    assert result.candidates == sorted(smallest)
    assert sorted(result.refined_norms) == sorted(smallest)
    assert all(result.triggers[c].refined for c in smallest)
    assert sum(t.refined for t in result.triggers.values()) == 2


def test_time_estimate_scales_with_the_budget(trained):
    model, data = trained
    kwargs = dict(num_classes=10, image_shape=(3, 32, 32), mean=data.mean, std=data.std)
    full = estimate_seconds(model, config=ReverseConfig(steps=100, batch_size=8), **kwargs)
    limited = estimate_seconds(
        model, config=ReverseConfig(steps=100, batch_size=8, classes=2, screen_steps=10), **kwargs
    )
    assert full > 0 and limited > 0  # timed, so only its sign is tested; the count below is exact
    assert class_steps(ReverseConfig(steps=100, batch_size=8), 10) == 10 * 100  # all classes: no screen
    assert class_steps(ReverseConfig(steps=100, classes=2, screen_steps=10), 10) == 2 * 100 + 10 * 10
    assert class_steps(ReverseConfig(steps=100, classes=[1, 2, 3]), 10) == 3 * 100  # given: no screen
    with pytest.raises(UsageError, match="at least 3 classes"):
        reverse_engineer(
            model,
            data.train_images,
            data.train_labels,
            num_classes=10,
            mean=data.mean,
            std=data.std,
            config=ReverseConfig(classes=[1, 2]),
        )
