"""The command line meets bad input with one ``error:`` paragraph naming the flag, file or field, a non-zero
exit code and no traceback; every command of the README parses (its work function is replaced by a stub)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import _tiny
from varjax import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("convert", "sample", "tokenize", "reconstruct", "edit", "export", "train", "train-tokenizer", "eval",
            "sweep", "main", "compile", "sample-many", "fid")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny tokenizer + transformer model directory (random weights, 16px)."""
    from varjax.core.model_dir import save_model_dir
    from varjax.models.var import VARConfig

    vae_cfg = _tiny.vq_cfg(vocab_size=16, z_channels=4, ch=8, ch_mult=(1, 2), num_groups=4)
    var_cfg = VARConfig(depth=1, embed_dim=16, num_heads=2, num_classes=3, vocab_size=16, Cvae=4,
                        patch_nums=(1, 2, 4, 8))
    d = tmp_path_factory.mktemp("model") / "m"
    save_model_dir(str(d), "var", vae_cfg, _tiny.vq_params(vae_cfg), var_cfg, _tiny.var_params(var_cfg))
    return str(d)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("inputs")
    corrupt = d / "corrupt"
    corrupt.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(corrupt / "a_good.png")
    (corrupt / "b_broken.png").write_bytes(b"\x89PNG not really an image")
    (d / "empty").mkdir()
    np.save(d / "rank2.npy", np.zeros((16, 16), np.float32))
    np.savez(d / "rank5.npz", images=np.zeros((1, 2, 16, 16, 3), np.float32))
    (d / "garbage.npy").write_bytes(b"not an npy file")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "photo.png")
    (d / "mask.png").write_bytes(b"GIF89a broken")
    return d


def run_main(argv, capsys):
    """(exit code, stderr) of ``varjax ARGV`` run in this process."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


def check_error(code, err, *names):
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert "error:" in err, err
    for n in names:
        assert n in err, (n, err)


@pytest.mark.parametrize(
    "case, argv, names",
    [
        ("corrupt image", ["tokenize", "--images", "{d}/corrupt", "--out", "{d}/t.npz"], ["b_broken.png"]),
        ("empty folder", ["reconstruct", "--images", "{d}/empty", "--out", "{d}/r"], ["empty", "no image files"]),
        ("rank-2 npy", ["tokenize", "--images", "{d}/rank2.npy", "--out", "{d}/t.npz"], ["rank2.npy", "(B, H, W, 3)"]),
        ("rank-5 npz", ["tokenize", "--images", "{d}/rank5.npz", "--out", "{d}/t.npz"], ["rank5.npz", "(B, H, W, 3)"]),
        ("garbage npy", ["reconstruct", "--images", "{d}/garbage.npy", "--out", "{d}/r"], ["garbage.npy"]),
        ("missing images", ["tokenize", "--images", "{d}/nowhere", "--out", "{d}/t.npz"], ["nowhere"]),
        ("corrupt mask", ["edit", "--image", "{d}/photo.png", "--mask", "{d}/mask.png", "--label", "0", "--out",
                          "{d}/e.png"], ["mask.png"]),
        ("missing image", ["edit", "--image", "{d}/none.png", "--mask", "{d}/mask.png", "--label", "0", "--out",
                           "{d}/e.png"], ["none.png"]),
        ("label range", ["sample", "--labels", "0,7", "--out", "{d}/s.png"], ["--labels", "0..2"]),
    ],
)
def test_bad_inputs_of_model_commands(case, argv, names, model_dir, bad_inputs, capsys):
    argv = [a.format(d=bad_inputs) for a in argv]
    argv = argv[:1] + ["--ckpt", model_dir] + argv[1:]
    code, err = run_main(argv, capsys)
    check_error(code, err, *names)
    assert code == 2


@pytest.mark.parametrize(
    "argv, names",
    [
        (["sample", "--ckpt", "x", "--labels", "1", "--out", "s.png", "--top-p", "7"], ["--top-p", "[0.0, 1.0]"]),
        (["sample", "--ckpt", "x", "--labels", "1", "--out", "s.png", "--top-p", "-0.1"], ["--top-p"]),
        (["sample", "--ckpt", "x", "--labels", "1", "--out", "s.png", "--top-k", "-1"], ["--top-k", ">= 0"]),
        (["sample", "--ckpt", "x", "--labels", "1", "--out", "s.png", "--cfg", "-2"], ["--cfg", ">= 0"]),
        (["sample", "--ckpt", "x", "--labels", "1", "--out", "s.png", "--top-k", "many"], ["--top-k", "integer"]),
        (["edit", "--ckpt", "x", "--image", "a", "--mask", "m", "--label", "1", "--out", "o", "--top-p", "1.5"],
         ["--top-p"]),
        (["eval", "--ckpt", "x", "--top-p", "3"], ["--top-p"]),
        (["eval", "--ckpt", "x", "--cfg", "-1"], ["--cfg"]),
        (["main", "--per-class", "0"], ["--per-class"]),
        (["sample", "--ckpt", "{tmp}/no_model", "--labels", "1", "--out", "s.png"], ["no_model"]),
        (["train", "--config", "var_shapes", "--workdir", "w", "--config.batchsize=8"],
         ["--config.batchsize=8", "batch_size"]),
        (["train", "--config", "var_shapes", "--workdir", "w", "--config.data.nme=x"], ["--config.data.nme", "name"]),
        (["train", "--config", "var_shapes", "--workdir", "w", "--config.batch_size=abc"],
         ["--config.batch_size", "abc"]),
        (["train", "--config", "var_shape", "--workdir", "w"], ["--config var_shape", "'var_shapes'"]),
        (["train-tokenizer", "--config", "configs/no_such.py", "--workdir", "w"], ["configs/no_such.py"]),
        (["main", "--var.batchsize=8"], ["--var.batchsize", "--var.batch_size?"]),
        (["main", "--tok.vae.vocab=8"], ["--tok.vae.vocab", "--tok.vae.vocab_size?"]),
        (["main", "--var.total_steps=many"], ["--var.total_steps=many"]),
    ],
)
def test_bad_flags(argv, names, capsys, tmp_path, monkeypatch):
    from varjax import config, train

    monkeypatch.chdir(tmp_path)
    ran = []

    def resolved(cfg, **kw):  # a config that loaded: the error was not found in time
        ran.append(cfg)
        raise RuntimeError("stub: configs parsed")

    monkeypatch.setattr(config, "resolve", resolved)
    monkeypatch.setattr(train, "train", lambda *a: ran.append(a))
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, err = run_main(argv, capsys)
    check_error(code, err, *names)
    assert not ran


def test_debug_shows_the_traceback(model_dir, bad_inputs):
    with pytest.raises(ValueError, match="b_broken.png"):
        cli.main(["--debug", "tokenize", "--ckpt", model_dir, "--images", str(bad_inputs / "corrupt"), "--out",
                  str(bad_inputs / "t.npz")])


def test_installed_entry_point_prints_one_paragraph(bad_inputs, model_dir):
    """The real process: exit code 2, the message on stderr, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "varjax", "reconstruct", "--ckpt", model_dir, "--images", str(bad_inputs / "corrupt"),
         "--out", str(bad_inputs / "r")],
        capture_output=True, text=True, timeout=600, cwd=bad_inputs,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
             "VARJAX_COMPILE_CACHE": os.environ["VARJAX_COMPILE_CACHE"]},
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "b_broken.png" in errors[0], r.stderr


# ---------------------------------------------------------------- README commands


def readme_commands(docs: bool = False) -> list[list[str]]:
    """Every ``varjax ...`` command in the README's bash blocks (continuations joined, `&&` chains split); with
    ``docs``, also those of ``docs/*.md``."""
    files = [ROOT / "README.md", *(sorted((ROOT / "docs").glob("*.md")) if docs else [])]
    text = "\n".join(f.read_text() for f in files)
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["varjax"]:
                    cmds.append(words[1:])
    return cmds


def test_readme_documents_the_main_job_command():
    assert ["main", "--workdir", "runs/main"] in readme_commands()
    documented = {c[0] for c in readme_commands(docs=True)}
    assert documented >= {"convert", "sample", "train", "train-tokenizer", "sweep", "main"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command, capsys):
    try:
        cli.main([command, "--help"])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert code in (0, None), out.err
    assert "usage" in out.out.lower()
    assert cli.COMMANDS[command].help.split(";")[0][:40] in " ".join(out.out.split())  # its own description


def test_top_level_help_lists_every_command_with_its_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert set(cli.COMMANDS) == set(COMMANDS)
    for name, command in cli.COMMANDS.items():
        assert name in out and command.help.split(";")[0][:30] in out, name
    assert "--help` for" not in out and "see `varjax" not in out  # no command is a pointer to another parser


@pytest.mark.parametrize("argv", readme_commands(docs=True), ids=lambda a: " ".join(a)[:60])
def test_documented_command_parses(argv, tmp_path, monkeypatch):
    """Parses the command and loads its configs (overrides applied); the work itself is a stub."""
    import dataclasses

    from varjax import aot, config, train
    from varjax.core import model_dir
    from varjax.eval import consistency, inception
    from varjax.scaling import sweep

    monkeypatch.chdir(tmp_path)
    calls = []

    def stub(name):
        def fn(*a, **k):
            calls.append(name)
        return fn

    for name in ("convert", "sample", "tokenize", "reconstruct", "edit", "export"):
        monkeypatch.setitem(cli.COMMANDS, name, dataclasses.replace(cli.COMMANDS[name], run=stub(name)))
    loaded = []
    monkeypatch.setattr(config, "resolve", lambda cfg, **k: loaded.append(cfg) or cfg)  # the plan: the config
    monkeypatch.setattr(train, "train", stub("train"))
    monkeypatch.setattr(consistency, "evaluate", stub("eval"))
    monkeypatch.setattr(sweep, "launch", stub("sweep launch"))
    monkeypatch.setattr(sweep, "fit", stub("sweep fit"))

    def stop(*a, **k):
        raise RuntimeError("stop")

    heavy = {  # commands whose work starts with one call: parsed up to it, then stopped there
        "compile": (aot, "topology_devices"),
        "sample-many": (model_dir, "load_model_dir"),
        "fid": (inception, "evaluate_fid"),
        "main": (train, "train"),  # both configs loaded and overridden, then the tokenizer stage is reached
    }.get(argv[0])
    if heavy is not None:
        monkeypatch.setattr(*heavy, stop)
        with pytest.raises(RuntimeError, match="stop"):
            cli.main(argv)
        if argv[0] == "main":
            model = argv[argv.index("--model") + 1] if "--model" in argv else "var"
            assert [c.task for c in loaded] == ["tokenizer"]
            assert loaded[0].model_type == ("kl" if model == "ecar" else "vq")
        return
    cli.main(argv)
    assert len(calls) == 1, calls
    if argv[0] in ("train", "train-tokenizer"):
        assert len(loaded) == 1 and (argv[0] == "train" or loaded[0].task == "tokenizer")


SIBLING_FAILS = '''
import asyncio

from varjax.core import errors


async def sibling():
    raise ValueError('OUT_OF_RANGE: Error reading "w/0.0" in OCDBT database')


loop = asyncio.new_event_loop()
task = loop.create_task(sibling())  # fails beside the reported failure; nobody retrieves its exception
loop.run_until_complete(asyncio.sleep(0.01))
with errors.boundary():
    raise ValueError("error: the reported failure")
'''


def test_nothing_is_printed_after_the_paragraph_when_a_sibling_task_failed_too(tmp_path):
    """A damaged Orbax directory fails several reads at once: the one raised is reported, and the others' tasks,
    collected at exit with their exceptions never retrieved, must not print asyncio's record after it."""
    script = tmp_path / "sibling.py"
    script.write_text(SIBLING_FAILS)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: the reported failure"], r.stderr
