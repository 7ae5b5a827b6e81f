"""Shared fixtures: one small local Ray cluster per test session, real data locations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PETA_ROOT = SHARED / "datasets" / "peta"

# Tests run on 2-core machines: keep every library to a small, fixed thread budget.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by every integration test of the session.

    Four logical CPUs on a 2-core machine leave room for Ray Data next to fractional-CPU
    training workers (the documented way to avoid the Data/Train resource deadlock).
    """
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def peta_root() -> Path:
    if not (PETA_ROOT / "PETA dataset").is_dir():
        pytest.skip(f"real PETA images not found at {PETA_ROOT} (../shared is absent)")
    return PETA_ROOT
