"""Shared fixtures: an isolated rkdtool cache, no hub access, two threads, the digits set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """Points RKDTOOL_CACHE at a session folder (demo teachers train once per session) and stays offline."""
    cache = tmp_path_factory.mktemp("rkdtool-cache")
    saved = {k: os.environ.get(k) for k in ("RKDTOOL_CACHE", "HF_HUB_OFFLINE")}
    os.environ["RKDTOOL_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # the machine's 2 cores, or as asked
    yield cache
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def digits():
    from rkdtool.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """The RobustKD trigger artifacts in ../shared/fixtures; tests using them skip where it is absent."""
    folder = SHARED / "fixtures" / "robustkd-official"
    if not folder.is_dir():
        pytest.skip("../shared/fixtures/robustkd-official is absent (tests that read it need ../shared)")
    return folder
