"""Shared test set-up: small thread counts and deterministic seeds keep the suite fast and stable."""

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
    # Two cores on CI: one intra-op thread per test process avoids oversubscription.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
