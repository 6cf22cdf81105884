"""Shared test set-up: one thread and fixed seeds keep the suite fast and stable."""

from __future__ import annotations

import os

from quantcal import _isa

# The demo and other studies pin `isa = "avx2"`, which holds only when set before PyTorch's
# first kernel runs; the tests that run them in this process get it from here (a study whose pin
# did not hold would say so in every row's notes). tests/test_isa.py checks the pin itself in
# fresh processes.
os.environ.update(_isa.environment("avx2"))

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
