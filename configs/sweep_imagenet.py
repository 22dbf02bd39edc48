"""The paper's scaling sweep on ImageNet 256x256: VAR depths 6 to 30 with the official shape rules.

embed_dim = 64 * depth, num_heads = depth, drop_path_rate = 0.1 * depth / 24, and the released training
recipes' learning-rate rule: lr = tblr * batch_size / 256 with tblr = 1e-4 at batch 768 (depth < 24) and
tblr = 8e-5 at batch 1024 (depth >= 24, which also use init_adaln_gamma 1e-4, or 1e-5 with a final weight
decay of 0.08 at depth 30). The budget follows the released runs: 200 epochs up to depth 16, 250 at 20,
350 from 24 on (written as examples, 1,281,167 per epoch, so the accounting needs no dataset).

    varjax sweep launch --config configs/sweep_imagenet.py --root gs://.../sweep --print-commands \\
        --config.tokenizer_dir=models/vae_ch160v4096z32 --config.data.data_dir=...

Arguments after ':': depths=6+8+10+12+16+20+24+30, epochs=0 (0: the per-depth budget above; otherwise the
same number of epochs for every member), member=<name>.
"""

from varjax.configs import common

IMAGENET_TRAIN_EXAMPLES = 1_281_167
ARGS = dict(depths=((6, 8, 10, 12, 16, 20, 24, 30), tuple), epochs=0.0)


def _args(arg):
    return common.parse_arg(arg, **ARGS)


def default_epochs(depth: int) -> float:
    return 200.0 if depth <= 16 else 250.0 if depth <= 20 else 350.0


def member_overrides(depth: int, epochs: float = 0.0) -> dict:
    big = depth >= 24
    bs = 1024 if big else 768
    ep = epochs or default_epochs(depth)
    o = {
        "model.depth": depth,
        "model.embed_dim": 64 * depth,
        "model.num_heads": depth,
        "model.drop_path_rate": 0.1 * depth / 24,
        "model.init_adaln_gamma": 1e-5 if depth >= 30 else 1e-4 if big else 1e-3,
        "batch_size": bs,
        "tblr": 8e-5 if big else 1e-4,
        "total_examples": int(round(ep * IMAGENET_TRAIN_EXAMPLES)),
    }
    if depth >= 30:
        o["opt.twde"] = 0.08
    return o


def get_config(arg=None):
    _args(arg)  # refuses unknown arguments; member=<name> is applied by the loader
    c = common.var(16)
    c.total_examples = int(round(default_epochs(16) * IMAGENET_TRAIN_EXAMPLES))
    c.data.hflip = False
    c.log_every = 100
    c.ckpt_every = 2000
    c.eval_every = 10_000  # and always at the last step
    return c


def sweep(add, arg=None):
    a = _args(arg)
    for depth in a.depths:
        add(name=f"d{depth}", **member_overrides(depth, a.epochs))
