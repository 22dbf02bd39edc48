"""Fine-tuning a converted official VAR tokenizer on ImageNet 256px with LPIPS and a PatchGAN.

    varjax convert --vae vae_ch160v4096z32.pth --out models/vae_official
    varjax train-tokenizer --config configs/tokenizer_finetune.py --workdir runs/tok_ft \
        --config.init_from=models/vae_official \
        --config.lpips_lin_path=weights/vgg.pth --config.lpips_vgg_path=weights/vgg16.pth \
        --config.data.manual_dir=/data/imagenet

The architecture is the tokenizer's in `init_from`: the `config.vae` fields are None here and are read from its
model directory (a field set with --config.vae.X=... must agree with it; only `dropout` and `beta` may differ).
Without `lpips_lin_path` the perceptual loss is off. `configs/tokenizer_finetune.py:runlocal` fine-tunes the
tokenizer in `init_from` for 2 steps on the embedded shapes data (no ImageNet needed).
"""

from varjax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, runlocal=False)
    c = common.tokenizer()
    for field in common.VQ_FIELDS:  # the architecture of the tokenizer in init_from
        if field not in ("dropout", "beta"):
            c.vae[field] = None
    c.init_from = ""  # required: the converted tokenizer directory
    c.require_init_from = True
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    c.data.hflip = True
    c.batch_size = 64
    c.total_steps = 50_000
    c.lr = 1e-5
    c.opt.warmup_steps = 1000
    c.opt.warmup_fraction = None
    c.l1_weight = 1.0
    c.l2_weight = 0.0
    c.lpips_weight = 1.0
    c.disc_weight = 0.2
    c.disc_start = 5000
    c.adaptive_disc_weight = True
    c.disc_lr = 1e-5
    c.ema_decay = 0.999
    c.reinit_dead_codes = False
    c.log_every = 100
    c.ckpt_every = 2000
    c.eval_every = 5000
    c.image_every = 1000
    if a.runlocal:
        c.data.name = "varjax_shapes/tiny"
        c.data.eval_split = "test"
        c.data.hflip = False
        c.batch_size = 8  # one example per device on up to 8 devices
        c.total_steps = 2
        c.disc_start = 1
        c.log_every = 1
        c.ckpt_every = 2
        c.eval_every = 0
        c.image_every = 0
    return c

