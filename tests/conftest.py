"""Test set-up: 8 virtual CPU devices (for mesh tests) and the shared reference vectors."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere: sharding tests build 2x2x2 meshes on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

GOLDEN = Path(os.environ.get("VARJAX_GOLDEN", Path(__file__).resolve().parents[1] / ".." / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    d = GOLDEN.resolve()
    if not (d / "io_public.npz").is_file():
        pytest.fail(f"reference vectors not found in {d}; set VARJAX_GOLDEN to the folder holding io_public.npz")
    return d
