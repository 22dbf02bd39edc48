"""``varjax main``: a whole method on the embedded dataset (``varjax_shapes``), with no download.

One table, one row per model family (``--model var``, the default, or ``ecar``); every row runs three stages:

1. trains the row's tokenizer (``configs/tokenizer_shapes.py``: the multi-scale VQ-VAE; or
   ``configs/ecar_tokenizer_shapes.py``: the KL autoencoder, whose decoder ``configs/ecar_decoder_shapes.py`` then
   teaches to clean noisy latents in ``DIR/decoder``) in ``DIR/tokenizer``;
2. encodes the training split once (a token or latent cache, ``DIR/tokens_train`` / ``DIR/latents_train``) and
   trains the generator on it (``configs/var_shapes.py`` / ``configs/ecar_shapes.py``) in ``DIR/var`` /
   ``DIR/ecar``;
3. samples a PNG grid (``DIR/samples.png``, one row per class, beside ``DIR/real_samples.png``, held-out real
   images in the same arrangement) and writes ``DIR/eval.json`` (see
   ``varjax.eval.consistency``: class consistency, the distribution metric, the tokenizer's scores, the
   sampler's cost).

Each stage resumes from its checkpoints, so re-running the command after an interruption continues.
``--tok.field=value`` and ``--var.field=value`` / ``--ecar.field=value`` override the two configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from varjax import config, train
from varjax.core import checkpoint, paths
from varjax.core.errors import at_least
from varjax.core.model_dir import load_model_dir
from varjax.data import caches
from varjax.data.images import save_grid
from varjax.eval.consistency import GRID_PER_CLASS, PER_CLASS, evaluate, real_per_class
from varjax.sampling.codec import encode_split


@dataclasses.dataclass(frozen=True)
class Demo:
    tokenizer_config: str
    generator_config: str
    prefix: str  # of the generator's overrides, and its directory
    cache: str  # "tokens" or "latents"
    cache_field: str  # the generator config field naming the cache
    sampling: dict  # sampling flags of the evaluation (missing ones: the model directory's defaults)
    default_workdir: str
    decoder_config: str | None = None  # a decoder-only fine-tune of the tokenizer, run after it (DIR/decoder)


DEMOS = {
    # No guidance and nucleus sampling (top-p 0.8) instead of the ImageNet defaults (6 classes, a 64-code
    # vocabulary). On the same model (16 per class): class consistency 96.9% (lowest class 87.5%), shape_fd 0.34,
    # recall 0.70; the former guidance 4 with top-k 2 read 91.7% (68.8%), 0.62 and 0.12: it drew few colours.
    "var": Demo("tokenizer_shapes", "var_shapes", "var", "tokens", "data.tokens_cache",
                {"cfg": 1.0, "top_k": 0, "top_p": 0.8}, "runs/main"),
    "ecar": Demo("ecar_tokenizer_shapes", "ecar_shapes", "ecar", "latents", "latents_cache", {}, "runs/main_ecar",
                 decoder_config="ecar_decoder_shapes"),
}


def _field(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def write_train_cache(gen_cfg, tokenizer_dir: str, kind: str, out: str) -> str:
    """The tokenizer's codes of the training split's centre crops (exactly the training inputs when the config has
    no crop jitter or flips), written once to ``out`` so that training does not run the encoder at every step."""
    if caches.exists(out, kind):
        return out
    if gen_cfg.data.hflip or gen_cfg.data.mid_reso != 1.0:
        raise ValueError("the cache holds centre crops: set the generator's data.mid_reso=1.0 and data.hflip=False.")
    b = load_model_dir(tokenizer_dir)
    codes, labels = encode_split(b.tok_cfg, b.tok_params, gen_cfg.data, gen_cfg.data.train_split)
    caches.write_cache(out, kind, codes, labels)
    print(f"[main] {kind} of {len(labels)} training images written to {out}", flush=True)
    return out


def decoder_config(demo: Demo, tok_cfg, tokenizer_dir: str, overrides: list[tuple[str, str]] = ()):
    """The decoder fine-tune's config: its own training fields, the architecture and data of ``tok_cfg`` (it
    continues that tokenizer, so ``--tok.vae.*`` / ``--tok.data.*`` reach it too), ``init_from`` the tokenizer's
    directory, then ``--dec.field=value`` overrides."""
    cfg = config.load(demo.decoder_config, [("init_from", tokenizer_dir)])
    cfg.vae.update(tok_cfg.vae.to_dict())
    cfg.data.update(tok_cfg.data.to_dict())
    return config.apply_overrides(cfg, list(overrides), "dec")


def run(model: str, workdir: str, tok_overrides: list[tuple[str, str]], gen_overrides: list[tuple[str, str]],
        per_class: int = PER_CLASS, dec_overrides: list[tuple[str, str]] = ()) -> dict:
    demo = DEMOS[model]
    wd = paths.resolve(workdir)
    t0 = time.time()
    tok_cfg = config.load(demo.tokenizer_config, tok_overrides, "tok")
    gen_cfg = config.load(demo.generator_config, gen_overrides, demo.prefix)
    gen_cfg.tokenizer_dir = str(wd / "tokenizer")
    print("[main] 1/3 training the tokenizer", flush=True)
    train.train(config.resolve(tok_cfg), str(wd / "tokenizer"))
    _stop_if_preempted(wd)
    if demo.decoder_config:  # same encoder, so the latents are the tokenizer's; samples decode through this one
        dec_cfg = decoder_config(demo, tok_cfg, str(wd / "tokenizer"), dec_overrides)
        print(f"[main] 1/3 teaching the decoder to clean noisy latents ({time.time() - t0:.0f}s so far)", flush=True)
        train.train(config.resolve(dec_cfg), str(wd / "decoder"))
        _stop_if_preempted(wd)
        gen_cfg.tokenizer_dir = str(wd / "decoder")
    if not _field(gen_cfg, demo.cache_field):
        cache = write_train_cache(gen_cfg, gen_cfg.tokenizer_dir, demo.cache, str(wd / f"{demo.cache}_train"))
        config.set_field(gen_cfg, demo.cache_field, cache)
    print(f"[main] 2/3 training {model.upper()} ({time.time() - t0:.0f}s so far)", flush=True)
    train.train(config.resolve(gen_cfg), str(wd / demo.prefix))
    _stop_if_preempted(wd)
    print(f"[main] 3/3 sampling and evaluating ({time.time() - t0:.0f}s so far)", flush=True)
    res = evaluate(str(wd / demo.prefix), per_class_n=per_class, flags=demo.sampling, grid=str(wd / "samples.png"))
    shown = min(per_class, GRID_PER_CLASS)
    save_grid(str(wd / "real_samples.png"), real_per_class(shown, res["image_size"]), nrow=shown)
    res["total_seconds"] = time.time() - t0
    paths.write_json(wd / "eval.json", res)
    print(json.dumps(res, indent=2))
    print(f"[main] samples: {wd / 'samples.png'} (real test images: {wd / 'real_samples.png'})   numbers: "
          f"{wd / 'eval.json'}")
    return res


def _stop_if_preempted(wd) -> None:
    """After a stage that saved on SIGTERM, the job ends there (exit 0): a re-run continues from that stage."""
    if checkpoint.preempted():
        print(f"[main] stopped by a termination signal after saving; re-run the same command to continue in {wd}",
              flush=True)
        raise SystemExit(0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="var", choices=sorted(DEMOS), help="var (default) or ecar (E-CAR)")
    p.add_argument("--workdir", default=None, help="default: runs/main (var) or runs/main_ecar (ecar)")
    p.add_argument("--per-class", type=at_least(1, int), default=PER_CLASS,
                   help="samples per class scored (the grid shows the first 16 of each)")


def command(a, rest: list[str]) -> None:
    """``varjax main``: ``rest`` holds the ``--tok.field=value`` and ``--<model>.field=value`` overrides."""
    demo = DEMOS[a.model]
    rest, tok = config.split_overrides(rest, "tok")
    rest, gen = config.split_overrides(rest, demo.prefix)
    dec = []
    if demo.decoder_config:
        rest, dec = config.split_overrides(rest, "dec")
    if rest:
        raise ValueError(f"unknown arguments {rest}; use --tok.field=value or --{demo.prefix}.field=value"
                         + (" (--dec.field=value for the decoder's fine-tune)" if demo.decoder_config else ""))
    run(a.model, a.workdir or demo.default_workdir, tok, gen, a.per_class, dec)
