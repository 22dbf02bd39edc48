"""Test set-up: 8 virtual CPU devices (for mesh tests) and the reference vectors in tests/data/golden."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: sharding tests build 2x2x2 meshes on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

# Reference vectors of the official PyTorch code (see tests/data/golden/README.md); they ship with the tests.
GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "io_public.npz").is_file():
        pytest.fail(f"reference vectors not found in {GOLDEN}: the test data of the repository is incomplete")
    return GOLDEN
