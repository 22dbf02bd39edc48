"""Test set-up: 8 virtual CPU devices (for mesh tests), one session-wide compilation cache and TFDS directory
(inherited by the tests' subprocesses), the reference vectors in tests/data/golden, and the tiny models
and data many tests share (built once per session)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must happen before jax is imported anywhere: sharding tests build 2x2x2 meshes on one CPU, and the tests' programs
# compile fast (see ``_tiny.FAST_COMPILE``).
from tests import _tiny  # noqa: E402 - numpy only at import

os.environ.setdefault("XLA_FLAGS", _tiny.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No Python stack frames in the programs' locations: XLA then carries less metadata through every pass (10-20% less
# compile time); op names stay, and a failing test's Python traceback is unchanged.
os.environ.setdefault("JAX_TRACEBACK_IN_LOCATIONS_LIMIT", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One directory for the run: JAX's persistent compilation cache (a program compiled once, in any process of the
# run: a pytest-xdist worker or a subprocess test, is loaded from disk by every later process that compiles it
# again) and the TFDS data (the embedded dataset is prepared once). The first process (pytest itself, or xdist's
# controller) makes it; the processes it starts inherit it. It starts empty, so the suite reads nothing from
# earlier runs.
_SESSION_ENV = "VARJAX_TEST_SESSION_DIR"
if _SESSION_ENV not in os.environ:
    os.environ[_SESSION_ENV] = tempfile.mkdtemp(prefix="varjax-tests-")
    atexit.register(shutil.rmtree, os.environ[_SESSION_ENV], ignore_errors=True)
_SESSION_DIR = os.environ[_SESSION_ENV]
os.environ["VARJAX_COMPILE_CACHE"] = os.path.join(_SESSION_DIR, "jax-cache")
os.environ["TFDS_DATA_DIR"] = os.path.join(_SESSION_DIR, "tfds")

import pytest  # noqa: E402

from varjax.core import compile_cache  # noqa: E402

compile_cache.enable()  # this process too: tests rebuild the same programs in new jitted functions

# Reference vectors of the official PyTorch code (see tests/data/golden/README.md); they ship with the tests.
GOLDEN = Path(__file__).resolve().parent / "data" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "io_public.npz").is_file():
        pytest.fail(f"reference vectors not found in {GOLDEN}: the test data of the repository is incomplete")
    return GOLDEN


@pytest.fixture(scope="session")
def shapes_data() -> str:
    """The TFDS directory with ``varjax_shapes/tiny`` prepared (before any subprocess reads it)."""
    return _tiny.prepare_shapes("varjax_shapes/tiny")


@pytest.fixture(scope="session")
def vq_dir(tmp_path_factory) -> str:
    """A tiny random VQ tokenizer model directory (32px, scales 1-2-4-8, 64 codes)."""
    d = tmp_path_factory.mktemp("vq") / "tok"
    _tiny.save_vq(d)
    return str(d)


@pytest.fixture(scope="session")
def kl_dir(tmp_path_factory) -> str:
    """A tiny random KL autoencoder model directory (32px, 8x8x4 latents)."""
    d = tmp_path_factory.mktemp("kl") / "tok"
    _tiny.save_kl(d)
    return str(d)


@pytest.fixture(scope="session")
def tokens_cache(tmp_path_factory) -> str:
    """A token cache of 64 random examples for the tiny VQ tokenizer (6 classes)."""
    d = tmp_path_factory.mktemp("tokens") / "cache"
    _tiny.write_tokens_cache(d, n=64)
    return str(d)


@pytest.fixture(scope="session")
def latents_cache(tmp_path_factory) -> str:
    """A latent cache of 64 random examples for the tiny KL autoencoder (6 classes)."""
    d = tmp_path_factory.mktemp("latents") / "cache"
    _tiny.write_latents_cache(d, n=64)
    return str(d)


@pytest.fixture(autouse=True)
def _no_pending_preemption():
    """Every test starts with no preemption notice pending: the flag is process-wide, and a run stops at its
    first step when it is set (as a SIGTERM between two stages of ``varjax main`` should make it)."""
    from varjax.core import checkpoint

    checkpoint.reset_preemption_flag()


# The slowest files (CPU seconds on 2 cores) start first: pytest-xdist hands whole files to its workers in collection
# order, and a slow file started last would run alone at the end of the suite.
SLOW_FIRST = ("test_ecar.py", "test_distributed_launch.py", "test_remote_paths.py", "test_tok_trainer.py",
              "test_var_trainer.py", "test_sample_many.py", "test_sweep.py", "test_no_tensorflow.py",
              "test_gpu_suite.py", "test_inception.py", "test_sample.py", "test_failures.py",
              "test_trainer_features.py", "test_legacy.py", "test_golden.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept within a file
