"""What a pod user expects of the trainer: EMA weights (exact on resume, used for sampling unless ``--no-ema``),
throughput in ``metrics.jsonl``, a profiler trace of chosen steps, and a persistent compilation cache.

A tiny VAR trains on the legacy fixtures' tokenizer and token cache (no TensorFlow), on the 8 test devices.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests import _tiny
from varjax import cli, config
from varjax import train as train_lib
from varjax.core import checkpoint, model_dir

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


def plan(**overrides):
    base = {"tokenizer_dir": str(LEGACY / "var_main" / "tokenizer"),
            "data.tokens_cache": str(LEGACY / "var_main" / "tokens_train"), "ema_decay": "0.9"}
    base.update(overrides)
    return config.resolve(config.load("var_shapes:runlocal", list(base.items())))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    checkpoint.reset_preemption_flag()  # a signal an earlier test sent this process must not stop this run
    train_lib.train(plan(total_steps="4", profile_steps="(2, 3)", peak_tflops="1.0"), str(run))
    return run


def test_profile_steps_write_a_trace(uninterrupted):
    traces = list((uninterrupted / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0


def test_metrics_carry_tokens_per_second_and_mfu(uninterrupted):
    rows = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    L = 1 + 4 + 16 + 64  # the fixture tokenizer's scales 1-2-4-8
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["img_per_s"] * L)
        assert r["tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / 1.0)  # the peak given by config.peak_tflops


def test_resumed_ema_equals_uninterrupted_ema(uninterrupted, tmp_path):
    checkpoint._PREEMPTED.set()  # as SIGTERM does: the run saves after its first step and stops
    try:
        train_lib.train(plan(total_steps="4"), str(tmp_path))
    finally:
        checkpoint.reset_preemption_flag()
    assert model_dir.read_manifest(tmp_path) and (tmp_path / "checkpoints" / "1").is_dir()
    train_lib.train(plan(total_steps="4"), str(tmp_path))
    for ema in (True, False):
        resumed = jax.tree.leaves(model_dir.load_params(tmp_path, "var", ema=ema))
        whole = jax.tree.leaves(model_dir.load_params(uninterrupted, "var", ema=ema))
        for a, b in zip(resumed, whole, strict=True):
            np.testing.assert_array_equal(a, b)


def test_sampling_uses_the_ema_weights_unless_no_ema(uninterrupted, tmp_path):
    assert model_dir.read_manifest(uninterrupted)["var"]["params"]["subtree"] == ["ema_params"]
    out = {}
    for flag in ([], ["--no-ema"]):
        npz = tmp_path / f"s{len(flag)}.npz"
        cli.main(["sample", "--ckpt", str(uninterrupted), "--labels", "0,1,2,3", "--top-k", "1", "--top-p", "0",
                  "--out", str(tmp_path / "s.png"), "--save-npz", str(npz), *flag])
        out[len(flag)] = np.load(npz)["tokens"]
    assert (out[0] != out[1]).any()  # greedy draws: the two weight sets give different tokens


def test_second_sample_start_loads_its_program_from_the_compilation_cache(tmp_path):
    env = {**os.environ, "VARJAX_COMPILE_CACHE": str(tmp_path / "cache"), "XLA_FLAGS": _tiny.xla_flags(1),
           "JAX_DEBUG_LOG_MODULES": "jax._src.compiler"}
    argv = [sys.executable, "-m", "varjax", "sample", "--ckpt", str(LEGACY / "model_dir"), "--labels", "0,1",
            "--out", str(tmp_path / "s.png")]
    first, second = (subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, (first.stderr[-2000:], second.stderr[-2000:])
    assert "Persistent compilation cache hit for 'jit_generate'" not in first.stderr
    assert "Persistent compilation cache hit for 'jit_generate'" in second.stderr
    assert list((tmp_path / "cache").glob("jit_generate-*"))


def _checkpoint_arrays(run) -> dict:
    """The newest checkpoint's train state as Orbax stored it (numpy), read without varjax's model directory."""
    import orbax.checkpoint as ocp

    step = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    item = run / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(item).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))


@pytest.fixture(scope="module")
def weights(uninterrupted):
    state = _checkpoint_arrays(uninterrupted)
    assert any((np.asarray(a) != np.asarray(b)).any()
               for a, b in zip(jax.tree.leaves(state["ema_params"]), jax.tree.leaves(state["params"]), strict=True))
    return {"ema": state["ema_params"], "raw": state["params"]}


def _bundle_with(run, params):
    b = model_dir.load_model_dir(run, need_generator=True)
    b.gen_params = jax.tree.map(np.asarray, params)
    return b


def test_sample_defaults_to_the_ema_weights(uninterrupted, weights, tmp_path):
    """The command's tokens equal the sampler's on the checkpoint's EMA arrays, and with --no-ema on the raw ones."""
    from varjax import sampling

    for which, flag in (("ema", []), ("raw", ["--no-ema"])):
        npz = tmp_path / f"{which}.npz"
        cli.main(["sample", "--ckpt", str(uninterrupted), "--labels", "0,1,2,3", "--top-k", "1", "--top-p", "0",
                  "--out", str(tmp_path / "s.png"), "--save-npz", str(npz), *flag])
        b = _bundle_with(uninterrupted, weights[which])
        opts = sampling.get("var").options(sampling.defaults(b), cfg=None, top_k=1, top_p=0.0)
        _, tokens = sampling.get("var").make_sampler(b.tok_cfg, b.gen_cfg, opts)(
            b.tok_params, b.gen_params, jax.numpy.asarray([0, 1, 2, 3]), jax.random.PRNGKey(0))
        np.testing.assert_array_equal(np.load(npz)["tokens"], np.asarray(tokens))


def test_sample_many_defaults_to_the_ema_weights(uninterrupted, weights, tmp_path):
    from varjax import sampling
    from varjax.eval.sample_many import read_extra, sample_many

    for which, flag in (("ema", []), ("raw", ["--no-ema"])):
        cli.main(["sample-many", "--ckpt", str(uninterrupted), "--out", str(tmp_path / which), "--classes", "0,1",
                  "--per-class", "2", "--top-k", "1", "--top-p", "0", *flag])
        b = _bundle_with(uninterrupted, weights[which])
        opts = sampling.get("var").options(sampling.defaults(b), cfg=None, top_k=1, top_p=0.0)
        sample_many(b, tmp_path / f"{which}_lib", classes=np.asarray([0, 1], np.int32), per_class=2, opts=opts)
        np.testing.assert_array_equal(read_extra(tmp_path / which), read_extra(tmp_path / f"{which}_lib"))


def test_export_defaults_to_the_ema_weights(uninterrupted, weights, tmp_path):
    from varjax.interop import convert
    from varjax.interop.torch_io import load_state_dict

    for which, flag in (("ema", []), ("raw", ["--no-ema"])):
        cli.main(["export", "--ckpt", str(uninterrupted), "--out", str(tmp_path / which), *flag])
        b = _bundle_with(uninterrupted, weights[which])
        want = convert.var_state_dict(b.gen_cfg, b.gen_params)
        got = load_state_dict(tmp_path / which / "var.pth")
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_eval_defaults_to_the_ema_weights(uninterrupted, weights, tmp_path, monkeypatch):
    from varjax.eval import consistency

    seen = []
    real = consistency.sample_per_class

    def spy(bundle, *args, **kwargs):
        seen.append(bundle.gen_params)
        return real(bundle, *args, **kwargs)

    monkeypatch.setattr(consistency, "sample_per_class", spy)
    monkeypatch.setattr(consistency, "tokenizer_numbers", lambda b, n: {})  # held-out images: not what is tested
    for which, flag in (("ema", []), ("raw", ["--no-ema"])):
        cli.main(["eval", "--ckpt", str(uninterrupted), "--per-class", "1", "--shape-ref", "0",
                  "--out", str(tmp_path / f"{which}.json"), *flag])
        for a, b in zip(jax.tree.leaves(seen.pop()), jax.tree.leaves(weights[which]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_ema_is_sharded_like_the_parameters():
    """On a 2x2x2 data/fsdp/tensor mesh, created and after a step: every EMA leaf has its parameter's sharding."""
    from varjax import tasks
    from varjax.core import mesh as mesh_lib
    from varjax.data import sources

    p = plan(mesh="(('data', 2), ('fsdp', 2), ('tensor', 2))")
    mesh = mesh_lib.create_mesh(p.mesh)
    task = tasks.get("var").build(p, mesh)
    init_fn, step_fn = train_lib.with_ema(task.init_fn, task.step_fn, p.ema_decay)
    rng = jax.random.PRNGKey(0)
    abstract = mesh_lib.abstract_sharded_state(init_fn, mesh, p.rules, rng)
    state, _ = mesh_lib.create_sharded_state(init_fn, mesh, p.rules, rng)

    def specs(tree):
        return [leaf.sharding.spec for leaf in jax.tree.leaves(tree)]

    assert specs(abstract["ema_params"]) == specs(abstract["params"])
    assert any(s != jax.sharding.PartitionSpec() for s in specs(abstract["params"]))  # the test means something
    assert specs(state["ema_params"]) == specs(state["params"])
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    local = next(sources.train_iterator(p.data, global_batch_size=p.batch_size, process_index=0, process_count=1,
                                        seed=0))
    batch = mesh_lib.make_global_batch(local, mesh)
    with mesh_lib.mesh_rules(mesh, p.rules):
        new, _ = train_lib.jit_train_step(step_fn, shardings, mesh)(state, batch, task.frozen)
    assert specs(new["ema_params"]) == specs(new["params"]) == specs(abstract["params"])


def test_a_changed_compute_dtype_is_refused_on_resume(tmp_path):
    train_lib.train(plan(total_steps="4", stop_at_step="2"), str(tmp_path))
    with pytest.raises(ValueError, match=r"config.model.dtype='float32'.*'bfloat16'.*--config.model.dtype=float32"):
        train_lib.train(plan(total_steps="4", **{"model.dtype": "bfloat16"}), str(tmp_path))
    train_lib.train(plan(total_steps="4"), str(tmp_path))  # the same dtype resumes
    assert (tmp_path / "checkpoints" / "4").is_dir()
