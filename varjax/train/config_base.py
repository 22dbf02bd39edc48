"""Shared defaults for the config files in ``configs/`` (each recipe overrides what it needs)."""

from __future__ import annotations

import ml_collections

from varjax.data import pipeline
from varjax.train import optim
from varjax.train.sharding import DEFAULT_MESH, DEFAULT_RULES

# Logical axes of activations: batch over every data-parallel axis, features replicated or over `tensor`.
ACTIVATION_RULES = (
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("classes", None),
    ("cvae", None),
)


def base_run() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 768
    c.total_epochs = ml_collections.FieldReference(None, field_type=float)
    c.total_steps = ml_collections.FieldReference(None, field_type=int)
    c.total_examples = ml_collections.FieldReference(None, field_type=int)
    c.mesh = tuple(DEFAULT_MESH)  # a tuple field: `--config.mesh="((...), ...)"` overrides it
    c.rules = list(DEFAULT_RULES) + list(ACTIVATION_RULES)
    # Multi-process settings; None = unset (detected from the launcher's environment, see
    # varjax/train/sharding.py:init_distributed).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    c.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
    c.distributed.process_id = ml_collections.FieldReference(None, field_type=int)
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_ckpts = 3
    c.async_ckpt = True
    c.eval_every = 0
    c.progress_every_s = 10.0
    c.data = pipeline.default_config()
    for k in ("data_dir", "manual_dir", "folder", "tokens_cache"):  # typed, so `--config.data.<k>=...` works
        c.data[k] = ml_collections.FieldReference(c.data.get(k), field_type=str)
    c.opt = optim.default_config()
    return c


def var_run(depth: int) -> ml_collections.ConfigDict:
    """The reference's VAR defaults (``utils/arg_util.py``) for ``depth``."""
    c = base_run()
    c.tokenizer_dir = ""  # a model directory from `varjax convert` or `varjax train-tokenizer`
    c.tblr = 1e-4  # lr = tblr * batch_size / 256
    c.ls = 0.0  # label smoothing
    c.pg = 0.0  # progressive training over the first pg fraction of steps (0: off)
    c.pg0 = 4
    c.pgwp = 0.0  # warm-up epochs of each new scale's loss weight (0: total_epochs / 300)
    c.model = ml_collections.ConfigDict(
        dict(
            depth=depth,
            embed_dim=None,
            num_heads=None,
            drop_path_rate=None,
            num_classes=None,
            shared_aln=False,
            attn_l2_norm=True,
            cond_drop_rate=0.1,
            init_adaln=0.5,
            init_adaln_gamma=1e-5,
            init_head=0.02,
            init_std=-1.0,
            scan_layers=False,
            remat="none",
            attention="auto",
            dtype="bfloat16",
        )
    )
    c.model.embed_dim = ml_collections.FieldReference(None, field_type=int)
    c.model.num_heads = ml_collections.FieldReference(None, field_type=int)
    c.model.drop_path_rate = ml_collections.FieldReference(None, field_type=float)
    c.model.num_classes = ml_collections.FieldReference(None, field_type=int)
    c.opt.twd, c.opt.twde, c.opt.sche, c.opt.wp0, c.opt.wpe, c.opt.tclip = 0.05, 0.0, "lin0", 0.005, 0.01, 2.0
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    return c


def official_var_run(
    depth: int,
    *,
    batch_size: int,
    epochs: float,
    tblr: float,
    alng: float,
    wpe: float,
    tokenizer_dir: str,
    twde: float = 0.0,
    shared_aln: bool = False,
    fsdp: int = 1,
    remat: str = "none",
    runlocal: bool = False,
) -> ml_collections.ConfigDict:
    """A released VAR recipe on ImageNet (the README's hyper-parameters; everything else ``var_run``'s).

    Blocks are scanned (``scan_layers``): one block is compiled instead of ``depth`` (a d16 step compiles in
    about a minute for a TPU slice), with ``remat`` as given. ``fsdp`` > 1 splits parameters and optimizer
    state over that many devices (mesh ``[('data', -1), ('fsdp', fsdp), ('tensor', 1)]``): what the
    2B-parameter models need to fit. ``runlocal`` keeps the model but trains 2 steps of batch 8 on the
    embedded shapes data (it still needs an official-shaped tokenizer directory), with fsdp over every device.
    """
    c = var_run(depth)
    c.tokenizer_dir = tokenizer_dir
    c.batch_size = batch_size
    c.total_epochs = float(epochs)
    c.tblr = tblr
    c.model.init_adaln_gamma = alng
    c.model.shared_aln = shared_aln
    c.opt.wpe = wpe
    c.opt.twde = twde
    if fsdp > 1:
        # the smoke test runs on whatever devices there are
        c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1)) if runlocal else (("data", -1), ("fsdp", fsdp),
                                                                                 ("tensor", 1))
    c.model.scan_layers = True
    c.model.remat = remat
    if runlocal:
        c.data.name = "varjax_shapes/tiny"
        c.data.eval_split = "test"
        c.total_epochs = None
        c.total_steps = 2
        c.batch_size = 8
        c.log_every = 1
        c.ckpt_every = 2
    return c
