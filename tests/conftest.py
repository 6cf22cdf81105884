"""Shared test set-up: one thread and fixed seeds keep the suite fast and stable."""

from __future__ import annotations

import os

import pytest
import torch

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Tiny models: threading overhead dominates, and on a loaded two-core machine two intra-op
    # threads made a 0.1 s forward take seconds. One thread per test process.
    torch.set_num_threads(1)
