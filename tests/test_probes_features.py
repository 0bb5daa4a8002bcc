"""Feature variance per stage, clean vs triggered (the RobustKD paper's Fig. 2)."""

from __future__ import annotations

import pytest
import torch
from digits_model import trained_wrn10

from rkdtool.data import normalize
from rkdtool.probes.bank import probe_bank
from rkdtool.probes.features import feature_variance


@pytest.fixture(scope="module")
def trained():
    return trained_wrn10()


def test_profile_has_one_row_per_stage_and_matches_a_direct_computation(trained):
    model, data = trained
    probe = probe_bank()[9].with_target(2)  # blend alpha 0.2
    profile = feature_variance(
        model,
        "wrn10-1",
        data.test_images,
        data.test_labels,
        probe,
        mean=data.mean,
        std=data.std,
        batch_size=64,
    )
    assert [s.stage for s in profile.stages] == ["block1", "block2", "block3"]
    assert profile.images == int((data.test_labels != 2).sum())  # non-target images only
    keep = data.test_images[data.test_labels != 2]
    seen = {}
    handle = model.block3.register_forward_hook(lambda m, i, o: seen.__setitem__("f", o))
    with torch.inference_mode():
        model(normalize(keep, data.mean, data.std))
        clean = seen["f"].flatten(1).var(1, unbiased=False)
        model(normalize(probe.apply(keep), data.mean, data.std))
        triggered = seen["f"].flatten(1).var(1, unbiased=False)
    handle.remove()
    last = profile.stages[-1]
    assert last.clean.mean == pytest.approx(float(clean.mean()), rel=1e-5)
    assert last.triggered.mean == pytest.approx(float(triggered.mean()), rel=1e-5)
    assert last.ratio == pytest.approx(float(triggered.mean() / clean.mean()), rel=1e-5)
    assert last.clean_distilled.mean > 0 and last.triggered_distilled is not None
    row = profile.to_json()["stages"][2]
    assert set(row) >= {"clean", "triggered", "ratio", "clean_distilled", "triggered_distilled"}


def test_clean_only_profile_and_comparison(trained):
    model, data = trained
    clean_only = feature_variance(model, "wrn10-1", data.test_images, mean=data.mean, std=data.std)
    assert all(s.triggered is None and s.ratio is None for s in clean_only.stages)
    assert clean_only.images == len(data.test_images)
    probe = probe_bank()[0]
    triggered = feature_variance(
        model, "wrn10-1", data.test_images, data.test_labels, probe, mean=data.mean, std=data.std
    )
    rows = triggered.compare(triggered)
    assert [r["triggered_ratio"] for r in rows] == pytest.approx([1.0, 1.0, 1.0])
    assert all(r["triggered_excess"] == 0 for r in rows)
    assert "triggered_ratio" not in clean_only.compare(clean_only)[0]
