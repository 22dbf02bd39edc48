"""Failures a user can act on: each ends in one ``error:`` paragraph naming the file, field or step and what to do,
a non-zero exit code, no traceback, and nothing printed after it; what was already written stays intact.

The commands run as a user runs them (``python -m varjax`` in a subprocess), so that whatever the libraries
underneath print from their own threads is seen too. The runs train a tiny VAR for a few steps from the legacy
fixtures' tokenizer and token cache (no TensorFlow), sharing one compilation cache.
"""

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import _tiny

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("compile_cache")
    return {**os.environ, "VARJAX_COMPILE_CACHE": str(cache), "XLA_FLAGS": _tiny.xla_flags(1), "JAX_PLATFORMS": "cpu"}


def varjax(argv, env, cwd, limit_file_size: int | None = None) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

    return subprocess.run([sys.executable, "-m", "varjax", *map(str, argv)], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600, preexec_fn=limit if limit_file_size else None)


def one_paragraph(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """The ``error:`` paragraph of a failed command, checked to be the last thing printed and the only trace."""
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    err = r.stderr.rstrip()
    start = err.rfind("error: ")
    assert start >= 0, err[-3000:]
    paragraph = err[start:]
    assert paragraph.count("\n") <= 2, paragraph  # one paragraph, at the very end
    for needle in needles:
        assert needle in paragraph, (needle, paragraph)
    return paragraph


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def train_argv(workdir, *extra):
    return ["train", "--config", "var_shapes:runlocal", "--workdir", workdir,
            f"--config.tokenizer_dir={LEGACY / 'var_main' / 'tokenizer'}",
            f"--config.data.tokens_cache={LEGACY / 'var_main' / 'tokens_train'}", *extra]


def test_truncated_array_file_in_a_model_directory(tmp_path, env):
    model = tmp_path / "model"
    shutil.copytree(LEGACY / "model_dir", model)
    data = sorted((model / "var").rglob("d/*"), key=lambda p: -p.stat().st_size)[0]
    data.write_bytes(data.read_bytes()[:100])
    r = varjax(["sample", "--ckpt", model, "--labels", "0,1", "--out", tmp_path / "s.png"], env, tmp_path)
    one_paragraph(r, 1, str(model / "var"), "cannot be read", "damaged")
    assert not (tmp_path / "s.png").exists()


def test_resume_with_a_changed_width_stops_before_touching_the_checkpoint(tmp_path, env):
    run = tmp_path / "var"
    shutil.copytree(LEGACY / "var_main", tmp_path, dirs_exist_ok=True)
    before = tree_digest(run / "checkpoints")
    r = varjax(train_argv(run, "--config.total_steps=6", "--config.model.embed_dim=48"), env, tmp_path)
    one_paragraph(r, 2, str(run), "model.embed_dim: 32 -> 48", "--config.init_from", "new --workdir")
    assert tree_digest(run / "checkpoints") == before


def test_config_file_that_does_not_parse(tmp_path, env):
    bad = tmp_path / "bad.py"
    bad.write_text("from varjax.configs import common\n\ndef get_config(arg=None)\n    return common.var(3)\n")
    r = varjax(["train", "--config", bad, "--workdir", tmp_path / "run"], env, tmp_path)
    one_paragraph(r, 2, str(bad), "line 3", "syntax")
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path, env):
    run = tmp_path / "run"
    r = varjax(train_argv(run, "--config.tblr=1e6", "--config.total_steps=8"), env, tmp_path)
    paragraph = one_paragraph(r, 1, "the loss is nan at step", "last good checkpoint (step 2)", "re-run")
    assert (run / "checkpoints" / "2").is_dir(), paragraph


def test_checkpoint_write_that_fails_keeps_the_last_finished_one_for_the_rerun(tmp_path, env):
    run = tmp_path / "run"
    # 2 steps finish and are saved; then every file above 150 kB fails to be written (as on a full disk)
    # (the schedule of the whole 6-step run from the start: the three runs share their compiled step)
    first = train_argv(run, "--config.total_steps=6", "--config.stop_at_step=2", "--config.model.embed_dim=64")
    assert varjax(first, env, tmp_path).returncode == 0
    saved = tree_digest(run / "checkpoints" / "2")
    r = varjax(train_argv(run, "--config.total_steps=6", "--config.model.embed_dim=64"), env, tmp_path,
               limit_file_size=150_000)
    one_paragraph(r, 1, str(run / "checkpoints"), "could not write step 4", "File too large",
                  "latest finished checkpoint (step 2) is intact")
    assert tree_digest(run / "checkpoints" / "2") == saved
    again = varjax(train_argv(run, "--config.total_steps=6", "--config.model.embed_dim=64"), env, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 2" in again.stdout
    assert (run / "checkpoints" / "6").is_dir() and not list((run / "checkpoints").glob("*tmp*"))


@pytest.mark.parametrize("first_line", ["Task exception was never retrieved",
                                        "_GatheringFuture exception was never retrieved"])
def test_asyncio_reports_of_a_failed_checkpoint_write_are_not_printed(first_line):
    # The failed write is reported once, in the error paragraph; asyncio's record of the same failure (a task or
    # the future gathering them, whichever the garbage collector finalises at exit) would follow it.
    import logging

    from varjax.core import checkpoint

    orbax_record = logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, first_line + "\nfuture: <"
                                     "exception=ValueError('writing run/checkpoints/4.orbax-checkpoint-tmp')>", None,
                                     None)
    other = logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, first_line + "\nfuture: <mine>", None,
                              None)
    keep = checkpoint._SaidByVarjax().filter
    assert not keep(orbax_record)
    assert keep(other)
