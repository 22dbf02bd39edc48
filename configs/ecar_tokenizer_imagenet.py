"""Continuous (KL) tokenizer of E-CAR for ImageNet 256px: 16x downsampling, 16 latent channels.

    varjax train-tokenizer --config configs/ecar_tokenizer_imagenet.py --workdir runs/ecar_tok_imagenet \
        --config.data.manual_dir=/data/imagenet --config.lpips_lin_path=vgg_lin.pth --config.lpips_vgg_path=vgg.pth

VAR's encoder/decoder layout (ch 128, ch_mult 1-1-2-2-4, attention at the lowest resolution) with a Gaussian
posterior, L1 reconstruction, KL weight 1e-6 (latent diffusion's), LPIPS weight 1 when its weights are given
and a PatchGAN (hinge, adaptive weight 0.5) from step 50k. ``configs/ecar_tokenizer_imagenet.py:runlocal`` is
a few-step smoke test on the embedded data.
"""

from varjax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, runlocal=False)
    c = common.kl_tokenizer()
    c.vae.update(dict(ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=16, num_res_blocks=2, using_sa=True,
                      using_mid_sa=True, num_groups=32, image_size=256))
    c.kl_weight = 1e-6
    c.l1_weight, c.l2_weight = 1.0, 0.0
    c.lpips_weight = 1.0
    c.disc_weight = 0.5
    c.disc_start = 50_000
    c.batch_size = 256
    c.total_epochs = 40.0
    c.lr = 1e-4
    if a.runlocal:
        common.runlocal(c, steps=2)
        c.vae.update(dict(ch=16, ch_mult=(1, 2, 2), num_groups=8, image_size=32, using_sa=False, using_mid_sa=False))
        c.disc_start = 1
    return c
