"""The varjax parts of the GPU suite (``bench/gpu_suite.sh`` runs each in its own process and time box).

    python bench/gpu_suite.py PART --out DIR [--smoke] [...]

Each part writes ``DIR/PART.json``; ``report`` reads them all, with the official code's JSON files written by
``bench/official_bench.py`` (``official_train_b64.json``, ...), and writes ``summary.json`` and ``summary.md``.

Parts:
  env        versions, the devices, and the bf16 matrix-product rate this device reaches (the MFU's yardstick
             besides the datasheet peak).
  attention  the block-causal attention paths (``cudnn``, ``xla``) against ``reference`` in float32 and bfloat16,
             values and gradients: the shapes and tolerances of tests/test_attention.py, and the d16 shape
             (16 heads of 64, 680 tokens) by relative error against a float32 reference. float32 products run at
             ``highest`` precision: a GPU's default float32 matmul is TF32, which is a bf16-class precision.
  golden     the golden model of tests/data/golden (converted from the official .pth files): its logits, and a
             greedy CFG sample whose tokens must equal the official code's (scanned and unscanned blocks).
  remat      compiles and times the scanned d16 bf16 training step at one batch for each remat candidate and
             picks the fastest (the programs land in the persistent compilation cache for ``train``).
  train      the training step (``varjax.tasks.var`` jitted by ``varjax.train.jit_train_step``, as the trainer
             runs it) at each batch: step time, tokens/s, MFU, peak device memory.
  sample     the compiled sampler (all scales, cfg, top-k, top-p and the VQVAE decode): batch-1 latency and the
             large batch's throughput, peak device memory.
  report     the tables.

Everything is synthetic: random token ids, random weights of the release's shapes, the golden .pth files.
Nothing here imports TensorFlow; each JSON records the TensorFlow modules loaded (``tf_modules``, must be
empty). ``--smoke`` uses tiny shapes so that the whole suite runs on a CPU in about a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

from proc_memory import current_rss_bytes, peak_rss_bytes  # bench/ is the script's directory

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TF_PREFIXES = ("tensorflow", "tensorflow_datasets")

# Targets of the benchmark (bench/README.md): varjax / official training tokens/s, MFU, batch-1 sampling.
TARGETS = {"train_speedup": 1.3, "mfu": 0.45, "sample_b1_s": 0.030}


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The models and batches of one suite run (the official builder's rules: width 64 * depth, depth heads)."""

    depth: int
    patch_nums: tuple[int, ...]
    vocab: int
    cvae: int
    vae_ch: int
    num_classes: int
    train_batches: tuple[int, ...]
    sample_batches: tuple[int, ...]
    top_k: int
    steps: int  # timed training steps per measurement, after one warm-up
    sample_steps: int  # timed sampling calls per measurement, after one warm-up
    remat_candidates: tuple[str, ...]  # what the remat trial compiles and times
    attn_case: tuple[int, int, int, tuple[int, ...]]  # (B, H, c, patch_nums) of the full-size attention check

    @property
    def width(self) -> int:
        return 64 * self.depth

    @property
    def tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def official_args(self, smoke: bool) -> list[str]:
        """The same models for bench/official_bench.py (one CPU thread in the smoke run: torch's thread pool
        stalls when the machine's cores are busy)."""
        return (["--threads", "1"] if smoke else []) + [
                "--depth", str(self.depth), "--patch-nums", ",".join(map(str, self.patch_nums)), "--vocab",
                str(self.vocab), "--cvae", str(self.cvae), "--vae-ch", str(self.vae_ch), "--num-classes",
                str(self.num_classes), "--top-k", str(self.top_k), "--top-p", "0.96", "--cfg", "1.5"]


FULL = Shapes(depth=16, patch_nums=PATCH_NUMS_256, vocab=4096, cvae=32, vae_ch=160, num_classes=1000,
              train_batches=(64, 128), sample_batches=(1, 64), top_k=900, steps=10, sample_steps=5,
              remat_candidates=("none", "dots"),
              attn_case=(4, 16, 64, PATCH_NUMS_256))
# The smoke run compiles as few programs as it can (a training step takes about 10 s of CPU to compile, even this
# small): one remat candidate, one training batch (the trial's program, loaded back from the compilation cache) and
# one sampling batch.
SMOKE = Shapes(depth=2, patch_nums=(1, 2, 3, 4), vocab=64, cvae=8, vae_ch=32, num_classes=10,
               train_batches=(4,), sample_batches=(1,), top_k=32, steps=2, sample_steps=2,
               remat_candidates=("dots",),
               attn_case=(2, 4, 32, (1, 2, 3, 4, 6)))


def shapes_for(smoke: bool) -> Shapes:
    return SMOKE if smoke else FULL


# ------------------------------------------------------------------------------------------------ plumbing


def configs_common():
    """``varjax.configs.common``; in a source checkout that is not pip-installed (the GPU image runs the checkout
    from PYTHONPATH) the folder ``configs/`` is registered as the package ``varjax.configs``, as setup.py maps it."""
    try:
        from varjax.configs import common
    except ModuleNotFoundError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "varjax.configs", ROOT / "configs" / "__init__.py", submodule_search_locations=[str(ROOT / "configs")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["varjax.configs"] = module
        spec.loader.exec_module(module)
        from varjax.configs import common
    return common


def tf_modules() -> list[str]:
    """TensorFlow / TFDS modules this process has imported (the suite must import none)."""
    return sorted(m for m in sys.modules if m.split(".")[0] in TF_PREFIXES)


def device_memory() -> dict:
    """The device allocator's counters (``jax.Device.memory_stats``; None on backends without them), and the
    process's peak resident memory."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {**{k: stats.get(k) for k in keys}, "peak_rss_bytes": peak_rss_bytes()}


def program_memory(compiled) -> dict | None:
    """XLA's buffer assignment of one compiled program: what it allocates on the device."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    out = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def write_json(out: str, name: str, res: dict) -> None:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res = {**res, "tf_modules": tf_modules(), "cpu_s": ru.ru_utime + ru.ru_stime}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    print(f"[gpu-suite] wrote {name}.json", flush=True)


def median_time(fn, steps: int) -> tuple[float, list[float]]:
    """(first call's seconds, compile included, and each of ``steps`` further calls), each call awaited."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


# ---------------------------------------------------------------------------------------------------- env


def part_env(a, sh: Shapes) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from varjax.core import devices

    d = jax.devices()[0]
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "ml_collections"):
        try:
            versions[name] = getattr(__import__(name, fromlist=["_"]), "__version__", "?")
        except ImportError:
            versions[name] = None
    # the bf16 product rate this device reaches on random data (METHOD.md: measure the ceiling, never zeros)
    n = 512 if a.smoke else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    x, y = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in (ka, kb))
    mm = jax.jit(lambda x, y: x @ y)
    first, times = median_time(lambda: mm(x, y), 3 if a.smoke else 10)
    peak = devices.peak_flops(d)
    return {
        "python": platform.python_version(),
        "versions": versions,
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "peak_tflops_datasheet": peak / 1e12 if peak else None,
        "matmul_bf16": {"n": n, "seconds": float(np.median(times)),
                        "tflops": 2 * n**3 / float(np.median(times)) / 1e12},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "memory": device_memory(),
    }


# ---------------------------------------------------------------------------------------------- attention


def _qkv(B, Lq, Lk, H, c, seed, dtype):
    import jax

    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, Lq, H, c), dtype), jax.random.normal(ks[1], (B, Lk, H, c), dtype),
            jax.random.normal(ks[2], (B, Lk, H, c), dtype))


def _loss_and_grads(impls, q, k, v, q_level, k_level, scale):
    """{impl: (output, d(sum(out * w))/d(q, k, v))} as tests/test_attention.py computes them, every implementation
    in one compiled program (one compile per case and dtype); ``reference32`` is the reference on the inputs
    cast to float32."""
    import jax
    import jax.numpy as jnp

    from varjax.models.attention import block_causal_attention

    w = jax.random.normal(jax.random.PRNGKey(9), q.shape[:3] + (v.shape[-1],))

    def one(impl, q, k, v):
        def f(q, k, v):
            o = block_causal_attention(q, k, v, q_level, k_level, scale=scale, implementation=impl)
            return (o.astype(jnp.float32) * w).sum(), o

        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    @jax.jit
    def run(q, k, v):
        out = {impl: one(impl, q, k, v) for impl in impls}
        out["reference32"] = one("reference", *(x.astype(jnp.float32) for x in (q, k, v)))
        return out

    return run(q, k, v)


def _attention_cases(sh: Shapes) -> dict:
    """name -> (B, H, c, q_level, k_level): the test's two cases and the full-size training case."""
    import numpy as np

    from varjax.models.var import level_ids

    lvl = level_ids((1, 2, 3, 4))
    q_s = lvl[lvl == 2]
    k_s = np.concatenate([lvl[lvl <= 2], np.full(5, 4, np.int32)])
    B, H, c, pns = sh.attn_case
    big = level_ids(pns)
    return {"training": (2, 2, 16, lvl, lvl), "sampling": (2, 2, 16, q_s, k_s),
            f"training_L{len(big)}_H{H}_c{c}": (B, H, c, big, big)}


def part_attention(a, sh: Shapes) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from varjax.models.attention import _auto

    gpu = jax.default_backend() == "gpu"
    rows = []
    for case, (B, H, c, q_level, k_level) in _attention_cases(sh).items():
        small = case in ("training", "sampling")
        scale = (0.25 if small else 1.0) / np.sqrt(c)
        for dtype in ("float32", "bfloat16"):
            q, k, v = _qkv(B, len(q_level), len(k_level), H, c, 0, jnp.dtype(dtype))
            rows_here, impls = [], ["reference"]
            for impl in ("xla", "cudnn"):
                row = {"case": case, "dtype": dtype, "impl": impl, "shape": [B, len(q_level), len(k_level), H, c]}
                if impl == "cudnn" and not gpu:
                    row.update(status="skipped", why="cudnn needs an NVIDIA GPU")
                elif impl == "cudnn" and dtype == "float32":
                    row.update(status="skipped", why="cudnn runs bfloat16/float16 only ('auto' picks xla for float32)")
                else:
                    impls.append(impl)
                rows_here.append(row)
            try:
                with jax.default_matmul_precision("highest"):
                    got = jax.device_get(_loss_and_grads(tuple(impls), q, k, v, q_level, k_level, scale))
            except Exception as e:  # noqa: BLE001 - a failing kernel is a result of this check
                for row in rows_here:
                    row.setdefault("status", "failed")
                    row.setdefault("why", f"{type(e).__name__}: {str(e)[:300]}")
                rows += rows_here
                continue
            names = ("out", "dq", "dk", "dv")
            refs = [got["reference"][0], *got["reference"][1]]
            refs32 = [got["reference32"][0], *got["reference32"][1]]
            tol = 1e-5 if dtype == "float32" else 2e-2  # tests/test_attention.py
            for row in rows_here:
                if "status" in row:
                    continue
                outs = [got[row["impl"]][0], *got[row["impl"]][1]]
                max_abs = {n: float(np.max(np.abs(np.float32(g) - np.float32(r)))) for n, g, r in
                           zip(names, outs, refs, strict=True)}
                rel = {n: float(np.linalg.norm(np.float32(g) - np.float32(r)) / max(np.linalg.norm(np.float32(r)),
                                                                                     1e-30))
                       for n, g, r in zip(names, outs, refs32, strict=True)}
                finite = all(bool(np.isfinite(np.float32(g)).all()) for g in outs)
                if small:  # the test's elementwise check, same dtype on both sides
                    ok = finite and all(np.allclose(np.float32(g), np.float32(r), atol=tol, rtol=tol)
                                        for g, r in zip(outs, refs, strict=True))
                    rule = f"allclose to reference in {dtype}, atol=rtol={tol}"
                else:  # full size: relative error against float32 (METHOD.md: bf16 between 1e-3 and 1e-2)
                    bound = 1e-5 if dtype == "float32" else 1e-2
                    ok = finite and max(rel.values()) <= bound
                    rule = f"||x - ref32|| / ||ref32|| <= {bound:g}"
                row.update(status="pass" if ok else "FAIL", rule=rule, max_abs_err=max_abs, rel_err_vs_f32=rel)
            rows += rows_here
        print(f"[attention] {case}: " + ", ".join(f"{r['impl']}/{r['dtype']} {r['status']}" for r in rows
                                                  if r["case"] == case), flush=True)
    ran = [r for r in rows if r["status"] != "skipped"]
    return {"rows": rows, "auto_bf16": _auto(jnp.bfloat16), "auto_f32": _auto(jnp.float32),
            "passed": bool(ran) and all(r["status"] == "pass" for r in ran)}


# ------------------------------------------------------------------------------------------------- golden


def part_golden(a, sh: Shapes) -> dict:
    import dataclasses as dc

    import jax
    import jax.numpy as jnp
    import numpy as np

    from varjax.interop.convert import convert_var, convert_vqvae
    from varjax.interop.torch_io import load_state_dict
    from varjax.models.var import VAR
    from varjax.models.var_params import fit_var_params
    from varjax.sampling.var import SampleOptions, make_sampler

    g = dict(np.load(GOLDEN / "io_public.npz"))
    pn = tuple(int(x) for x in g["patch_nums"])
    vae_cfg, vae_params = convert_vqvae(load_state_dict(GOLDEN / "vqvae_public.pth"), pn)
    var_cfg, var_params = convert_var(load_state_dict(GOLDEN / "var_public.pth"), pn)
    label = jnp.asarray(g["label"], jnp.int32)
    res: dict = {"precision": "highest", "checks": []}
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(lambda p: VAR(var_cfg).apply({"params": p}, label, jnp.asarray(g["var_input_BLC"])))(
            var_params)
        err = float(np.max(np.abs(np.asarray(logits) - g["logits_BLV"])))
        res["checks"].append({"name": "logits (teacher forcing, float32)", "max_abs_err": err, "tol": 1e-4,
                              "status": "pass" if err <= 1e-4 else "FAIL"})
        for scan in (True,) if a.smoke else (False, True):  # the smoke run: the scanned blocks only
            cfg = dc.replace(var_cfg, scan_layers=scan)
            params = fit_var_params(var_params, cfg)
            sampler = make_sampler(vae_cfg, cfg, SampleOptions(cfg=float(g["cfg"]), top_k=1, top_p=0.0))
            img, tokens = sampler(vae_params, params, label, jax.random.PRNGKey(0))
            tokens = np.asarray(tokens)
            same = int((tokens == g["sample_idx_BL"]).sum())
            img_err = float(np.max(np.abs(np.asarray(img) - g["sample_img"].transpose(0, 2, 3, 1))))
            ok = same == tokens.size and img_err <= 1e-3
            res["checks"].append({"name": f"greedy cfg sample ({'scanned' if scan else 'unrolled'} blocks)",
                                  "tokens_equal": f"{same}/{tokens.size}", "image_max_abs_err": img_err,
                                  "tol": 1e-3, "status": "pass" if ok else "FAIL"})
    for c in res["checks"]:
        print(f"[golden] {c['name']}: {c['status']}", flush=True)
    res["passed"] = all(c["status"] == "pass" for c in res["checks"])
    return res


# ------------------------------------------------------------------------------------------------ training


def vae_config(sh: Shapes):
    from varjax.models.vqvae import VQVAEConfig

    return VQVAEConfig(vocab_size=sh.vocab, z_channels=sh.cvae, ch=sh.vae_ch, patch_nums=sh.patch_nums)


def random_params(abstract, seed: int):
    """Random weights for a tree of shapes, drawn on the host (no init program to compile): biases 0, norm scales 1,
    everything else N(0, 0.02), as bench/official_bench.py fills the official VQVAE. Timings do not depend on the
    values; these keep every activation finite."""
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "bias":
            return np.zeros(x.shape, x.dtype)
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        return (rng.standard_normal(x.shape, np.float32) * 0.02).astype(x.dtype)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract))


def random_vqvae(vae_cfg, seed: int = 1):
    """The whole tokenizer (the trainer holds the frozen tokenizer, as the official trainer does), random."""
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from varjax.models.vqvae import VQVAE

    s = vae_cfg.image_size
    abstract = jax.eval_shape(lambda r: VQVAE(vae_cfg).init(r, jnp.zeros((1, s, s, 3)), method=VQVAE.init_all)[
        "params"], jax.random.PRNGKey(seed))
    return random_params(meta.unbox(abstract), seed)


def random_var(var_cfg, seed: int = 0):
    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from varjax.models.var import VAR

    abstract = jax.eval_shape(lambda r: VAR(var_cfg).init(
        r, jnp.zeros((1,), jnp.int32), jnp.zeros((1, var_cfg.L - 1, var_cfg.Cvae)), method=VAR.init_all)["params"],
        jax.random.PRNGKey(seed))
    return random_params(meta.unbox(abstract), seed)


class TrainProgram:
    """The trainer's own step for a synthetic token batch: ``varjax.tasks.var.build`` (teacher forcing from token
    ids, forward, backward, AdamW) jitted by ``varjax.train.jit_train_step`` with the trainer's shardings and
    donation, compiled ahead of time so that its memory plan can be read. ``prev``: a program of the same model
    whose state (created by the trainer's sharded init), shardings and frozen tokenizer are reused: they do not
    depend on the batch or the remat policy, and one init program less to compile."""

    def __init__(self, sh: Shapes, batch: int, remat: str, *, dtype: str = "bfloat16", scan: bool = True,
                 attention: str = "auto", prev: TrainProgram | None = None):
        import jax
        import numpy as np

        from varjax import config, tasks
        from varjax.core import mesh as mesh_lib
        from varjax.data.sources import DataPlan
        from varjax.train import jit_train_step, with_ema

        cfg = configs_common().var(sh.depth)
        cfg.batch_size = batch
        cfg.total_steps = 1000
        cfg.model.num_classes = sh.num_classes
        cfg.model.scan_layers = scan
        cfg.model.remat = remat
        cfg.model.attention = attention
        cfg.model.dtype = dtype
        tok = vae_config(sh)
        data = DataPlan(source="tokens", cache=None, num_shards=1, steps_per_epoch=1000, num_classes=sh.num_classes,
                        image_size=tok.image_size, config=cfg.data)
        plan = config.resolve(cfg, num_devices=jax.device_count(), process_count=1, tokenizer=(None, tok), data=data)
        mesh = mesh_lib.create_mesh(plan.mesh)
        task = tasks.get("var").build(plan, mesh, abstract=True)  # nothing read from disk
        init_fn, step_fn = with_ema(task.init_fn, task.step_fn, plan.ema_decay)
        if prev is None:
            self.frozen = {"vae": jax.device_put(random_vqvae(tok), mesh_lib.replicated_sharding(mesh))}
            self.state, self.shardings = mesh_lib.create_sharded_state(init_fn, mesh, plan.rules,
                                                                       jax.random.PRNGKey(0))
        else:
            self.frozen, self.state, self.shardings = prev.frozen, prev.state, prev.shardings
        shardings = self.shardings
        rng = np.random.default_rng(0)
        self.batches = [mesh_lib.make_global_batch(
            {"tokens": rng.integers(0, sh.vocab, (batch, plan.model.L), dtype=np.int32),
             "label": rng.integers(0, sh.num_classes, (batch,), dtype=np.int32)}, mesh) for _ in range(2)]
        self.rss_before_compile = current_rss_bytes()
        t0 = time.perf_counter()
        with mesh_lib.mesh_rules(mesh, plan.rules):
            lowered = jit_train_step(step_fn, shardings, mesh, task.conv_bound).lower(self.state, self.batches[0],
                                                                                     self.frozen)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.rss_after_compile = current_rss_bytes()
        if prev is not None:
            prev.state = None  # donated to this program's steps from now on
        self.model, self.batch, self.remat, self.dtype = plan.model, batch, remat, dtype
        self.flops_per_step = task.flops_per_example * batch
        self.i = 0

    def step(self):
        self.state, m = self.compiled(self.state, self.batches[self.i % len(self.batches)], self.frozen)
        self.i += 1
        return self.state, m

    def measure(self, steps: int) -> dict:
        import jax

        from varjax.core import devices

        first, times = median_time(self.step, steps)
        m = jax.device_get(self.step()[1])
        step_s = statistics.median(times)
        peak = devices.peak_flops(jax.devices()[0])
        c = self.model
        return {
            "impl": "varjax",
            "depth": c.depth, "width": c.embed_dim, "heads": c.num_heads, "tokens_per_image": c.L,
            "batch_size": self.batch, "dtype": self.dtype, "scan_layers": c.scan_layers, "remat": c.remat,
            "attention": c.attention,
            "compile_s": self.compile_s, "first_step_s": first, "times_s": times, "step_time_s": step_s,
            "images_per_s": self.batch / step_s, "tokens_per_s": self.batch * c.L / step_s,
            "train_tflops_per_step": self.flops_per_step / 1e12,
            "achieved_tflops_per_s": self.flops_per_step / step_s / 1e12,
            "mfu": self.flops_per_step / step_s / peak if peak else None,
            "loss": float(m["loss"]),
            "program_memory": program_memory(self.compiled),
        }


def part_remat(a, sh: Shapes) -> dict:
    """Times each remat candidate (attention 'auto': cuDNN on a GPU in bf16); remat.json is rewritten after each,
    so a trial stopped by its time box still leaves the candidates it finished. If none runs, 'xla' attention is
    tried once, so that a failing cuDNN kernel does not stop the training measurements."""
    batch = a.batch or sh.train_batches[0]
    rows, prog = [], None
    plan = [(r, "auto") for r in (a.candidates.split(",") if a.candidates else sh.remat_candidates)]
    res: dict = {"batch_size": batch, "candidates": rows, "chosen": None, "attention": None,
                 "rule": "the candidate with the shortest median step time at this batch"}
    while plan:
        remat, attention = plan.pop(0)
        try:
            prog = TrainProgram(sh, batch, remat, attention=attention, prev=prog)
            row = prog.measure(a.steps or max(3, sh.steps // 2))
        except Exception as e:  # noqa: BLE001 - e.g. out of memory or a kernel that fails: that candidate is out
            row = {"remat": remat, "attention": attention, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(f"[remat] {remat} ({attention} attention): " + (
            f"{row['step_time_s'] * 1e3:.1f} ms/step (compile {row['compile_s']:.1f} s)" if "step_time_s" in row
            else row["error"]), flush=True)
        ok = [r for r in rows if "step_time_s" in r]
        if ok:
            best = min(ok, key=lambda r: r["step_time_s"])
            res.update(chosen=best["remat"], attention=best["attention"])
        elif not plan and attention == "auto":
            plan.append((rows[0]["remat"], "xla"))
        write_json(a.out, "remat", res)
    return res


def chosen_remat(a) -> tuple[str, str, str]:
    """(remat, attention, why): the remat part's choice, else the fallback rule."""
    path = os.path.join(a.out, "remat.json")
    if a.remat:
        return a.remat, "auto", "given"
    if os.path.exists(path):
        with open(path) as f:
            r = json.load(f)
        if r.get("chosen"):
            tried = [c["remat"] for c in r["candidates"] if "step_time_s" in c]
            return r["chosen"], r.get("attention") or "auto", f"fastest of {tried} at batch {r['batch_size']}"
    # Rule when the trial did not finish: on a device with memory to spare, keep every activation ('none': no
    # recomputation, the fewest FLOPs per step).
    return "none", "auto", "fallback rule (remat trial missing): none, the fewest FLOPs when memory allows"


def part_train(a, sh: Shapes) -> dict:
    remat, attention, why = chosen_remat(a)
    rows, prog = [], None
    for batch in sh.train_batches:  # ascending, so each process-peak reading is that batch's own
        try:
            prog = TrainProgram(sh, batch, remat, attention=attention, prev=prog)
            row = prog.measure(a.steps or sh.steps)
            row["memory"] = device_memory()
        except Exception as e:  # noqa: BLE001
            row = {"batch_size": batch, "remat": remat, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        if "step_time_s" in row:
            mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
            print(f"[train] batch {batch}: {row['step_time_s'] * 1e3:.1f} ms/step, {row['tokens_per_s']:,.0f} "
                  f"tokens/s{mfu}", flush=True)
        else:
            print(f"[train] batch {batch}: {row['error']}", flush=True)
        res = {"remat": remat, "attention": attention, "remat_why": why, "rows": rows}
        write_json(a.out, "train", res)  # kept if a later batch hangs
    return res


# ------------------------------------------------------------------------------------------------ sampling


def part_sample(a, sh: Shapes) -> dict:
    import jax
    import jax.numpy as jnp

    from varjax.models.attention import _auto
    from varjax.models.var import VARConfig
    from varjax.sampling.var import SampleOptions, make_sampler

    vae_cfg = vae_config(sh)
    var_cfg = VARConfig.official(sh.depth, patch_nums=sh.patch_nums, vocab_size=sh.vocab, Cvae=sh.cvae,
                                 num_classes=sh.num_classes, scan_layers=bool(a.scan))
    var_params, vae_params = random_var(var_cfg), random_vqvae(vae_cfg)
    opts = SampleOptions(cfg=1.5, top_k=sh.top_k, top_p=0.96, dtype=a.dtype)
    attention = _auto(jnp.dtype(a.dtype))
    rows = []
    for batch in sh.sample_batches:  # ascending: each process-peak reading is that batch's own
        labels = jnp.arange(batch, dtype=jnp.int32) % sh.num_classes
        key = jax.random.PRNGKey(0)
        error = None
        try:
            first, times = median_time(lambda labels=labels, key=key, o=opts: make_sampler(vae_cfg, var_cfg, o)(
                vae_params, var_params, labels, key), a.steps or sh.sample_steps)
        except Exception as e:  # noqa: BLE001 - a failing kernel: measured again with the xla attention
            if opts.attention == "xla":
                raise
            error = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"[sample] {attention} attention failed ({error}); again with xla", flush=True)
            opts, attention = dataclasses.replace(opts, attention="xla"), "xla"
            first, times = median_time(lambda labels=labels, key=key, o=opts: make_sampler(vae_cfg, var_cfg, o)(
                vae_params, var_params, labels, key), a.steps or sh.sample_steps)
        med = statistics.median(times)
        row = {"impl": "varjax", "batch_size": batch, "dtype": a.dtype, "scan_layers": a.scan,
               "attention": attention, "attention_error": error, "cfg": 1.5,
               "top_k": sh.top_k, "top_p": 0.96, "image_size": vae_cfg.image_size, "first_call_s": first,
               "times_s": times, "sample_time_s": med, "images_per_s": batch / med, "memory": device_memory()}
        rows.append(row)
        print(f"[sample] batch {batch}: {med * 1e3:.1f} ms per call, {batch / med:.1f} images/s (first call "
              f"{first:.1f} s)", flush=True)
        write_json(a.out, "sample", {"rows": rows})
    return {"rows": rows}


# -------------------------------------------------------------------------------------------------- report


def _load(out: str, name: str) -> dict | None:
    try:
        with open(os.path.join(out, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _parts_status(out: str) -> dict:
    """parts.tsv (written by gpu_suite.sh): name -> {status, rc, seconds, box}."""
    status = {}
    try:
        with open(os.path.join(out, "parts.tsv")) as f:
            for line in f:
                name, st, rc, sec, box, *why = line.rstrip("\n").split("\t")
                status[name] = {"status": st, "rc": int(rc), "seconds": int(sec), "box": int(box),
                                "why": why[0] if why else ""}
    except OSError:
        pass
    return status


def _gib(x) -> str:
    return f"{x / 2**30:.2f} GiB" if isinstance(x, int | float) and x else "n/a"


def _peak(row: dict, key: str = "peak_bytes_in_use") -> float | None:
    mem = row.get("memory") or {}
    return mem.get(key) if key in mem else row.get(key)


def official_flops_per_step(sh: Shapes, batch: int) -> float:
    """The same analytic count as varjax's (block-causal attention counted as masked), for the same shapes."""
    from varjax.models import flops
    from varjax.models.var import VARConfig

    cfg = VARConfig.official(sh.depth, patch_nums=sh.patch_nums, vocab_size=sh.vocab, Cvae=sh.cvae,
                             num_classes=sh.num_classes)
    return float(flops.train_flops_per_sequence(cfg, "masked")) * batch


def part_report(a, sh: Shapes) -> dict:
    env = _load(a.out, "env") or {}
    parts = _parts_status(a.out)
    attn, golden = _load(a.out, "attention"), _load(a.out, "golden")
    remat, train, sample = _load(a.out, "remat"), _load(a.out, "train"), _load(a.out, "sample")
    peak = (env.get("peak_tflops_datasheet") or 0) * 1e12 or None
    md = [f"# GPU suite ({'CPU smoke, tiny shapes' if a.smoke else 'd16, 256px'})", ""]
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md.append(f"Device: {env.get('device_count', '?')} x {env.get('device_kind', '?')} ({env.get('platform', '?')}); "
              f"jax {env.get('versions', {}).get('jax', '?')}; {date}.")
    mm = env.get("matmul_bf16")
    if mm:
        md.append(f"bf16 {mm['n']}^3 product on this device: {mm['tflops']:.3g} TFLOP/s (datasheet peak "
                  f"{env.get('peak_tflops_datasheet') or 'n/a'}).")
    md += ["", "## Parts", "", "| part | status | seconds | time box |", "|---|---|---|---|"]
    for name, s in parts.items():
        md.append(f"| {name} | {s['status']}{' (' + s['why'] + ')' if s['why'] else ''} | {s['seconds']} | "
                  f"{s['box']} |")

    md += ["", "## Correctness", "", "| check | dtype | result | detail |", "|---|---|---|---|"]
    for r in (attn or {}).get("rows", []):
        detail = r.get("why") or (f"max abs err {max(r['max_abs_err'].values()):.2e}, rel err vs f32 "
                                  f"{max(r['rel_err_vs_f32'].values()):.2e}; {r['rule']}")
        md.append(f"| attention {r['impl']} vs reference, {r['case']} | {r['dtype']} | {r['status']} | {detail} |")
    for c in (golden or {}).get("checks", []):
        detail = (f"tokens equal {c['tokens_equal']}, image max abs err {c['image_max_abs_err']:.1e}"
                  if "tokens_equal" in c else f"max abs err {c['max_abs_err']:.1e} (tol {c['tol']:g})")
        md.append(f"| golden model: {c['name']} | float32 | {c['status']} | {detail} |")
    if attn is None:
        md.append("| attention | | missing | see logs/attention.log |")
    if golden is None:
        md.append("| golden model | | missing | see logs/golden.log |")

    # training
    md += ["", "## Training step (bf16, scanned blocks)", ""]
    if remat:
        cands = ", ".join(f"{c['remat']} {c['step_time_s'] * 1e3:.1f} ms" if "step_time_s" in c else
                          f"{c['remat']} failed" for c in remat["candidates"])
        md.append(f"Remat trial at batch {remat['batch_size']}: {cands}; chosen: {remat['chosen']}.")
    if train:
        md.append(f"Remat used: {train['remat']} ({train['remat_why']}).")
    md += ["", "| code | batch | step time | tokens/s | MFU | peak device memory | program memory (XLA) | "
           "varjax / official tokens/s |", "|---|---|---|---|---|---|---|---|"]
    train_rows = []
    for batch in sh.train_batches:
        vj = next((r for r in (train or {}).get("rows", []) if r.get("batch_size") == batch), None)
        off = _load(a.out, f"official_train_b{batch}")
        if off and peak:
            off["mfu"] = official_flops_per_step(sh, batch) / off["step_time_s"] / peak
        ratio = (vj["tokens_per_s"] / off["tokens_per_s"]) if vj and off and "tokens_per_s" in vj else None
        for name, r in (("varjax", vj), ("official", off)):
            if r is None or "step_time_s" not in r:
                md.append(f"| {name} | {batch} | {(r or {}).get('error', 'missing')} | | | | | |")
                continue
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
            pm = _gib((r.get("program_memory") or {}).get("total")) if name == "varjax" else "n/a"
            dev_peak = _peak(r) if name == "varjax" else r.get("peak_device_bytes")
            md.append(f"| {name} | {batch} | {r['step_time_s'] * 1e3:.1f} ms | {r['tokens_per_s']:,.0f} | {mfu} | "
                      f"{_gib(dev_peak) if dev_peak else 'RSS ' + _gib(_peak(r, 'peak_rss_bytes'))} | {pm} | "
                      f"{f'{ratio:.2f}' if (ratio and name == 'varjax') else ''} |")
        train_rows.append({"batch_size": batch, "varjax": vj, "official": off, "tokens_per_s_ratio": ratio})

    # sampling
    md += ["", f"## Sampling (cfg 1.5, top-k {sh.top_k}, top-p 0.96, decode included)", "",
           "| code | batch | time per call | images/s | peak device memory |", "|---|---|---|---|---|"]
    sample_rows = []
    for batch in sh.sample_batches:
        vj = next((r for r in (sample or {}).get("rows", []) if r.get("batch_size") == batch), None)
        off = _load(a.out, f"official_sample_b{batch}")
        off_kind = "fp16 autocast" if off and not off.get("device", "").startswith("cpu") else "float32 on CPU"
        for name, r in ((f"varjax ({(vj or {}).get('dtype', 'bfloat16')})", vj), (f"official ({off_kind})", off)):
            if r is None:
                md.append(f"| {name} | {batch} | missing | | |")
                continue
            dev_peak = _peak(r) if name.startswith("varjax") else r.get("peak_device_bytes")
            md.append(f"| {name} | {batch} | {r['sample_time_s'] * 1e3:.1f} ms | {r['images_per_s']:.1f} | "
                      f"{_gib(dev_peak) if dev_peak else 'RSS ' + _gib(_peak(r, 'peak_rss_bytes'))} |")
        sample_rows.append({"batch_size": batch, "varjax": vj, "official": off})

    # targets
    targets = {}
    if not a.smoke:
        best = [t for t in train_rows if t["tokens_per_s_ratio"]]
        if best:
            targets["train_speedup"] = max(t["tokens_per_s_ratio"] for t in best)
        mfus = [t["varjax"]["mfu"] for t in train_rows if t["varjax"] and t["varjax"].get("mfu")]
        if mfus:
            targets["mfu"] = max(mfus)
        b1 = next((s["varjax"] for s in sample_rows if s["batch_size"] == 1 and s["varjax"]), None)
        if b1:
            targets["sample_b1_s"] = b1["sample_time_s"]
        md += ["", "## Targets", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
        for k, want in TARGETS.items():
            got = targets.get(k)
            met = None if got is None else (got <= want if k == "sample_b1_s" else got >= want)
            show = (lambda x: f"{x * 1e3:.1f} ms") if k == "sample_b1_s" else (
                (lambda x: f"{x:.1%}") if k == "mfu" else (lambda x: f"{x:.2f}x"))
            verdict = "n/a" if met is None else ("yes" if met else "NO")
            md.append(f"| {k} | {'<=' if k == 'sample_b1_s' else '>='} {show(want)} | "
                      f"{show(got) if got is not None else 'n/a'} | {verdict} |")
    tf = sorted({m for d in (env, attn, golden, remat, train, sample) if d for m in d.get("tf_modules", [])})
    md += ["", f"TensorFlow modules imported by the varjax parts: {', '.join(tf) if tf else 'none'}."]
    varjax_parts = ("env", "attention", "golden", "remat", "train", "sample")
    missing = [n for n in varjax_parts if parts.get(n, {}).get("status") != "ok"]
    correct = bool(attn and attn.get("passed") and golden and golden.get("passed"))
    md += [f"Varjax parts not finished: {', '.join(missing) if missing else 'none'}; correctness "
           f"{'passed' if correct else 'FAILED'}; wall time {a.wall if a.wall is not None else '?'} s."]
    summary = {
        "smoke": a.smoke, "wall_s": a.wall, "ok": not missing and correct and not tf, "env": env, "parts": parts,
        "attention": attn, "golden": golden, "remat": remat,
        "train": train_rows, "sample": sample_rows, "targets": targets, "tf_modules": tf, "correct": correct,
    }
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return summary


PARTS = {"env": part_env, "attention": part_attention, "golden": part_golden, "remat": part_remat,
         "train": part_train, "sample": part_sample, "report": part_report}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=[*PARTS, "official-args"])
    p.add_argument("--out", default=".", help="folder of the suite's JSON files")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU smoke run)")
    p.add_argument("--steps", type=int, default=0, help="timed steps / calls (0: the shapes' default)")
    p.add_argument("--candidates", default="", help="remat: the remat policies to try (default: the shapes')")
    p.add_argument("--batch", type=int, default=0, help="remat: the batch of the trial (0: the first train batch)")
    p.add_argument("--remat", default="", help="train: this remat instead of the remat part's choice")
    p.add_argument("--dtype", default="bfloat16", help="sample: compute dtype")
    p.add_argument("--scan", type=int, default=1, help="sample: scanned blocks (1) or unrolled (0)")
    p.add_argument("--wall", type=int, default=None, help="report: the suite's wall seconds so far")
    p.add_argument("--field", default="", help="official-args: print this field of the shapes instead")
    a = p.parse_args(argv)
    sh = shapes_for(a.smoke)
    if a.part == "official-args":  # for gpu_suite.sh: the official code's flags for the same models
        if a.field == "steps":
            print(sh.steps, sh.sample_steps)
        elif a.field:
            print(" ".join(map(str, getattr(sh, a.field))))
        else:
            print(" ".join(sh.official_args(a.smoke)))
        return 0
    t0 = time.time()
    if a.part != "report":
        from varjax.core import compile_cache

        compile_cache.enable()  # VARJAX_COMPILE_CACHE: the remat trial's programs serve the train part
    res = PARTS[a.part](a, sh)
    res["part_seconds"] = time.time() - t0
    write_json(a.out, "summary" if a.part == "report" else a.part, res)
    if a.part == "report":
        return 0 if res["ok"] else 1
    return 0 if res.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
