"""One small real model for the probe, metric, feature and reverse-engineering tests, trained once per
pytest process: a WRN-10-1 trained for a few epochs on scikit-learn's digits (CONVENTIONS: small and real)."""

from __future__ import annotations

import functools

import torch

from rkdtool.data import ImageData, load_dataset
from rkdtool.models import build_model
from rkdtool.training import ClassifierRecipe, seed_everything, train_classifier


@functools.cache
def trained_wrn10() -> tuple[torch.nn.Module, ImageData]:
    """Gives back (an eval-mode WRN-10-1 trained 6 epochs on digits, the digits data). Do not modify it.

    Test accuracy 88.1-92.5% over seeds 0-3, one and two threads, and oneDNN/MKL held to AVX (AMD EPYC,
    2026-12-02); three epochs at a constant rate gave 19-47% and failed a threshold on an Intel Xeon."""
    data = load_dataset("digits")
    model = build_model("wrn10-1", 10)
    recipe = ClassifierRecipe(epochs=6, batch_size=64, lr=0.05, schedule="step")
    train_classifier(model, data, recipe, generator=seed_everything(0), device=torch.device("cpu"))
    return model.eval(), data
