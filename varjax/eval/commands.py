"""The scoring commands: ``eval`` (the embedded data's numbers), ``fid`` (FID and its relatives) and
``sample-many`` (many samples for FID); each a parser and a function."""

from __future__ import annotations

import argparse
import json
import time

from varjax.core import paths
from varjax.core.errors import at_least
from varjax.core.metrics import format_eta


def eval_args(p: argparse.ArgumentParser) -> None:
    from varjax.sampling.commands import sampling_flags

    p.add_argument("--ckpt", required=True, help="model directory or training workdir (a generator or a tokenizer)")
    p.add_argument("--per-class", type=at_least(1, int), default=64,
                   help="samples per class scored (the grid shows the first 16 of each)")
    p.add_argument("--heldout", type=at_least(1, int), default=256, help="held-out images for the tokenizer PSNR")
    sampling_flags(p, top_k=0, top_p=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="optional PNG grid of the samples (one row per class)")
    p.add_argument("--out", default=None, help="JSON file (default: CKPT/eval.json)")
    p.add_argument("--inception", default=None, help="Inception weights (pt_inception-2015-12-05-*.pth) for FID")
    p.add_argument("--fid-ref", default=None, help="reference statistics .npz for FID (see `varjax fid`)")
    p.add_argument("--shape-ref", type=at_least(0, int), default=600,
                   help="test images as the reference of shape_fd / shape_precision / shape_recall (0: off)")


def evaluate(a) -> None:
    from varjax.eval.consistency import evaluate as run

    flags = {k: getattr(a, k) for k in ("cfg", "top_k", "top_p", "more_smooth", "flow_steps", "solver",
                                        "temperature", "stage_cfg", "stage_steps")}
    res = run(a.ckpt, per_class_n=a.per_class, num_heldout=a.heldout, flags=flags, seed=a.seed, grid=a.grid,
              inception=a.inception, fid_ref=a.fid_ref, ema=not a.no_ema, shape_ref=a.shape_ref)
    out = a.out or paths.resolve(a.ckpt) / "eval.json"
    paths.write_json(out, res)
    print(json.dumps(res, indent=2))
    print(f"[eval] wrote {out}")


def fid_args(p: argparse.ArgumentParser) -> None:
    from varjax.models.inception import PREPROCESS

    p.add_argument("--samples", required=True, help="folder, ADM .npz (arr_0), tfds:NAME/SPLIT or statistics .npz")
    p.add_argument("--ref", required=True, help="the same kinds, e.g. VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--inception", default=None, help="pt_inception-2015-12-05-*.pth (pytorch-fid's FID weights)")
    p.add_argument("--out", default=None, help="JSON (default: next to --samples, <name>_fid.json)")
    p.add_argument("--batch-size", type=at_least(1, int), default=64, help="images per Inception call, over all "
                   "devices")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="Inception compute dtype")
    p.add_argument("--image-size", type=at_least(1, int), default=256, help="centre-crop size for tfds: inputs")
    p.add_argument("--preprocess", choices=PREPROCESS, default="torch",
                   help="resize and scaling before the network: torch (pytorch-fid) or adm (ADM's TF graph)")


def fid(a) -> None:
    import jax.numpy as jnp

    from varjax.eval.inception import evaluate_fid

    if a.out:
        out = paths.resolve(a.out)
    elif a.samples.startswith("tfds:"):
        out = paths.resolve("fid.json")
    else:
        s = paths.resolve(a.samples)
        out = s.with_name(s.name.removesuffix(".npz") + "_fid.json")
    res = evaluate_fid(a.samples, a.ref, a.inception, out, a.batch_size, jnp.dtype(a.dtype), a.image_size,
                       a.preprocess)
    paths.write_json(out, res)
    print(json.dumps(res, indent=2))
    print(f"[fid] wrote {out}")


def sample_many_args(p: argparse.ArgumentParser) -> None:
    from varjax.sampling.commands import sampling_flags

    p.add_argument("--ckpt", required=True, help="model directory (varjax convert) or training workdir")
    p.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    p.add_argument("--per-class", type=at_least(1, int), default=50)
    p.add_argument("--classes", default="all", help="all | 0-99 | 3,7")
    sampling_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=at_least(1, int), default=None, help="global batch (default 8 per device)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="VAR transformer compute "
                   "dtype")
    p.add_argument("--max-chunks", type=at_least(1, int), default=None, help="stop after this many new chunks "
                   "(resume later)")


def sample_many(a) -> None:
    from varjax import sampling
    from varjax.core import distributed
    from varjax.core.model_dir import load_model_dir
    from varjax.eval.sample_many import parse_classes, sample_many

    t0 = time.time()
    distributed.init_distributed()  # pods and clusters are detected from the environment; one process otherwise
    b = load_model_dir(a.ckpt, need_generator=True, ema=not a.no_ema)
    opts = sampling.get(b.family).options(sampling.defaults(b), **vars(a))
    classes = parse_classes(a.classes, b.gen_cfg.num_classes)
    res = sample_many(b, a.out, classes=classes, per_class=a.per_class, opts=opts, seed=a.seed,
                      batch_size=a.batch_size, max_chunks=a.max_chunks)
    took = format_eta(time.time() - t0)
    out = paths.resolve(a.out)
    if res.npz is None:
        print(f"[sample-many] stopped after {res.generated_chunks} new chunks ({took}); re-run the same command to "
              f"continue in {out}")
    else:
        print(f"[sample-many] {res.num_samples} samples of {len(classes)} classes in {out} ({res.generated_chunks} "
              f"chunks generated in this run, {took}): images in {out / 'images'}, all of them in {res.npz}. Next: "
              f"varjax fid --samples {res.npz} --ref REF.npz --inception pt_inception-2015-12-05-6726825d.pth")
