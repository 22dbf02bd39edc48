"""Tiny models, configs and data shared by the tests: each compiles and steps in seconds on a CPU.

Model directories and caches are written by the conftest's session fixtures (``vq_dir``, ``kl_dir``,
``tokens_cache``, ``latents_cache``, ``shapes_data``); the helpers here build them and the configs that
name them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 6  # varjax_shapes

# The tests' programs are tiny and run a few steps: compiling them (LLVM's optimisation passes, and the MLIR fusion
# emitters, which take half the compile time of a train step) costs far more than running them, so every test
# process, subprocesses included, compiles with the backend's cheapest settings: no LLVM optimisation, the older
# elemental emitters for fusions, and the generated code in one LLVM module (split for parallel code generation,
# a program costs 10-20% more CPU time to compile, and the suite keeps both cores busy anyway). XLA's rewrites of
# the program are the same and fast-math stays off, so results agree with the default build to float rounding,
# well within every tolerance the tests compare with.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` of a test process with ``devices`` virtual CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"

# 32px, 8x8 latents: the tokenizers of the runlocal configs' size class.
VQ_ARGS = dict(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False,
               using_mid_sa=False, patch_nums=(1, 2, 4, 8), num_groups=8)
KL_ARGS = dict(z_channels=4, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False, using_mid_sa=False,
               num_groups=8, image_size=32)


# The scaling sweep of the tests (tests/test_sweep.py, and on gs:// in tests/test_remote_paths.py): members d2-d4 of
# width 8 per block, two steps each, on a 4-scale tokenizer. Both files train the same programs, so the second
# loads them from the session's compilation cache.
SWEEP_CONFIG = "configs/sweep_shapes.py:runlocal,width=8,steps=2"
SWEEP_VQ = dict(vocab_size=32, ch=8, ch_mult=(1, 1, 2, 2), patch_nums=(1, 2, 3, 4), num_groups=4)


def vq_cfg(**kw):
    from varjax.models.vqvae import VQVAEConfig

    return VQVAEConfig(**{**VQ_ARGS, **kw})


def kl_cfg(**kw):
    from varjax.models.kl_ae import KLAEConfig

    return KLAEConfig(**{**KL_ARGS, **kw})


def vq_params(cfg=None, seed: int = 0):
    """Initial parameters of a VQ tokenizer (host numpy, no logical-axis boxes)."""
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from varjax.models.vqvae import VQVAE

    cfg = cfg or vq_cfg()
    s = cfg.image_size
    init = jax.jit(lambda k: VQVAE(cfg).init(k, jnp.zeros((1, s, s, 3)), method=VQVAE.init_all)["params"])
    return jax.device_get(meta.unbox(init(jax.random.PRNGKey(seed))))


def kl_params(cfg=None, seed: int = 0):
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from varjax.models.kl_ae import KLAE

    cfg = cfg or kl_cfg()
    s = cfg.image_size
    init = jax.jit(lambda k: KLAE(cfg).init(k, jnp.zeros((1, s, s, 3)), method=KLAE.init_all)["params"])
    return jax.device_get(meta.unbox(init(jax.random.PRNGKey(seed))))


def var_params(var_cfg, seed: int = 1):
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from varjax.models.var import VAR

    x = jnp.zeros((1, var_cfg.L - var_cfg.first_l, var_cfg.Cvae))
    init = jax.jit(lambda k: VAR(var_cfg).init(k, jnp.zeros((1,), jnp.int32), x, method=VAR.init_all)["params"])
    return jax.device_get(meta.unbox(init(jax.random.PRNGKey(seed))))


def save_vq(path, cfg=None, seed: int = 0):
    """A VQ tokenizer model directory at ``path`` (local or a URL); returns its parameters."""
    from varjax.core.model_dir import save_model_dir

    cfg = cfg or vq_cfg()
    params = vq_params(cfg, seed)
    save_model_dir(str(path), "vq", cfg, params)
    return params


def save_kl(path, cfg=None, seed: int = 0):
    from varjax.core.model_dir import save_model_dir

    cfg = cfg or kl_cfg()
    params = kl_params(cfg, seed)
    save_model_dir(str(path), "kl", cfg, params)
    return params


def write_tokens_cache(path, n: int = 64, seed: int = 0, cfg=None) -> None:
    from varjax.data import caches

    cfg = cfg or vq_cfg()
    rng = np.random.default_rng(seed)
    L = sum(p * p for p in cfg.patch_nums)
    caches.write_cache(str(path), "tokens", rng.integers(0, cfg.vocab_size, (n, L)),
                       np.arange(n) % NUM_CLASSES)


def write_latents_cache(path, n: int = 64, seed: int = 0, cfg=None) -> None:
    from varjax.data import caches

    cfg = cfg or kl_cfg()
    rng = np.random.default_rng(seed)
    side = cfg.latent_size
    caches.write_cache(str(path), "latents", rng.normal(size=(n, side, side, cfg.z_channels)),
                       np.arange(n) % NUM_CLASSES)


def prepare_shapes(name: str = "varjax_shapes/tiny") -> str:
    """Prepares the embedded dataset ``name`` in ``$TFDS_DATA_DIR`` (set by the conftest); returns that directory."""
    import fcntl

    import tensorflow_datasets as tfds

    import varjax.data.shapes_tfds  # noqa: F401 - registers the builder

    data_dir = os.environ["TFDS_DATA_DIR"]
    os.makedirs(data_dir, exist_ok=True)
    # the test processes of one run share the directory: one prepares, the others wait and reuse it
    with open(os.path.join(data_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            builder.download_and_prepare()
    return data_dir


def set_fields(cfg, **over):
    """``cfg.a.b = v`` for every ``a__b=v`` (or ``"a.b": v``) keyword; returns ``cfg``."""
    from varjax import config

    for key, value in over.items():
        config.set_field(cfg, key.replace("__", "."), value, where="test")
    return cfg


def load(spec: str, **over):
    """A shipped config (``var_shapes:runlocal``...) loaded as ``varjax train`` loads it, fields set by keyword."""
    from varjax import config

    return set_fields(config.load(spec), **over)


QUIET = dict(async_ckpt=False, progress_every_s=1e9)  # synchronous saves, no progress lines

# Runs that are compared with each other (resumed against uninterrupted, killed against whole) plan this one long
# schedule with a constant lr and wd, each ending where it needs to with config.stop_at_step: the schedule's length
# is a constant of the compiled step, so all of them, subprocesses included, build one program.
ONE_SCHEDULE = {"opt.wpe": 1.0, "opt.warmup_fraction": 0.0, "total_steps": 100_000}


def flags(fields: dict) -> list[str]:
    """``--config.FIELD=VALUE`` command-line flags of ``{"a.b": value}``."""
    return [f"--config.{k}={v}" for k, v in fields.items()]


def read_losses(workdir) -> dict[int, float]:
    """``{step: loss}`` of ``WORKDIR/metrics.jsonl``; fails if a step is logged twice (two writers)."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"metrics.jsonl repeats steps {steps}"
    return {r["step"]: r["loss"] for r in rows}


def subprocess_env(**extra) -> dict:
    """The environment of a varjax subprocess: this one's (the session's compilation cache and TFDS data, the CPU
    platform), the checkout importable, and ``extra``."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return env


def var_config(tokenizer_dir: str, tokens_cache: str | None = None, **over):
    """``var_shapes:runlocal`` (depth 2, width 32) on ``tokenizer_dir``, reading ``tokens_cache`` when given."""
    c = load("var_shapes:runlocal", tokenizer_dir=str(tokenizer_dir), **QUIET)
    if tokens_cache:
        c.data.tokens_cache = str(tokens_cache)
    return set_fields(c, **over)


def ecar_config(tokenizer_dir: str, latents_cache: str | None = None, **over):
    """``ecar_shapes:runlocal`` (depth 2, width 32, head 2 x 32) on ``tokenizer_dir``, reading ``latents_cache``."""
    c = load("ecar_shapes:runlocal", tokenizer_dir=str(tokenizer_dir), **QUIET)
    if latents_cache:
        c.latents_cache = str(latents_cache)
    return set_fields(c, **over)


def build(cfg, devices=None):
    """(plan, mesh, task) as ``varjax.train.train`` builds them, on ``devices`` (default: all 8)."""
    import jax

    from varjax import config, tasks
    from varjax.core import mesh as mesh_lib

    devices = list(devices or jax.devices())
    plan = config.resolve(cfg, num_devices=len(devices), process_count=1)
    mesh = mesh_lib.create_mesh(plan.mesh, devices=devices)
    return plan, mesh, tasks.get(plan.task).build(plan, mesh)


def plan_without_data(cfg, num_devices: int = 1, steps_per_epoch: int = 100, tokenizer=None):
    """The Plan of ``cfg`` for a step test: an image source of ``steps_per_epoch`` batches, nothing opened."""
    from varjax import config, tasks
    from varjax.data import sources

    task = tasks.get(cfg.task)
    tok = tokenizer or task.tokenizer_of(cfg)
    derived = task.derive(cfg, tok[1])
    data = sources.DataPlan(source="images", cache=None, num_shards=1, steps_per_epoch=steps_per_epoch,
                            num_classes=derived.num_classes or NUM_CLASSES, image_size=derived.image_size,
                            config=cfg.data)
    return config.resolve(cfg, num_devices=num_devices, process_count=1, tokenizer=tok, data=data)
