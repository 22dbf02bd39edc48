"""Scaling sweep on the embedded `varjax_shapes` dataset (no download): VAR depths 2, 3, 4 by default.

The official shape rules, with a narrower width so the sweep fits a CPU or a small GPU:
embed_dim = width * depth (the released models use width 64), num_heads = depth,
drop_path_rate = 0.1 * depth / 24. Every member trains for the same number of steps (the token budget)
and evaluates on the test split at its last step.

    varjax sweep launch --config configs/sweep_shapes.py --root runs/sweep_shapes \\
        --config.tokenizer_dir=runs/tok_shapes
    varjax sweep fit --root runs/sweep_shapes

Arguments after ':' (comma-separated): depths=2+3+4, width=32, steps=1500, runlocal (tiny dataset, a few
steps), member=<name> (one member's config, as used by the commands that `--print-commands` prints).
"""

from varjax.configs import common

ARGS = dict(runlocal=False, depths=((2, 3, 4), tuple), width=32, steps=(None, int))


def _args(arg):
    return common.parse_arg(arg, **ARGS)


def get_config(arg=None):
    a = _args(arg)
    c = common.var(a.depths[0])
    c.model.dtype = "float32"
    c.data.name = "varjax_shapes"
    c.data.eval_split = "test"
    c.data.mid_reso = 1.0
    c.data.shuffle_buffer = 4096
    c.batch_size = 64
    c.total_steps = a.steps or 1500
    c.tblr = 1e-3 * 256 / 64
    c.opt.wpe = 0.05
    c.opt.warmup_fraction = 0.03
    c.log_every = 25
    c.ckpt_every = 250
    if a.runlocal:
        c.data.name = "varjax_shapes/tiny"
        c.batch_size = 8
        c.total_steps = a.steps or 3
        c.log_every = 1
        c.async_ckpt = False
    c.ckpt_every = min(c.ckpt_every, c.total_steps)
    c.eval_every = c.get_ref("total_steps")  # evaluate once, at the end (and follow --config.total_steps)
    return c


def sweep(add, arg=None):
    a = _args(arg)
    for depth in a.depths:
        add(
            name=f"d{depth}",
            **{
                "model.depth": depth,
                "model.embed_dim": a.width * depth,
                "model.num_heads": depth,
                "model.drop_path_rate": 0.1 * depth / 24,
            },
        )
