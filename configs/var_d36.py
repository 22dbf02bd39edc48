"""VAR-d36-s on ImageNet 512px, the official recipe.

    varjax train --config configs/var_d36.py --workdir runs/var_d36 \
        --config.tokenizer_dir=runs/tok_vae_ch160v4096z32_512

The tokenizer is the released ``vae_ch160v4096z32`` converted for 512px (its patch_nums set the
model's scales) with::

    varjax convert --vae vae_ch160v4096z32.pth --patch-nums 1,2,3,4,6,9,13,18,24,32 --out runs/tok_vae_ch160v4096z32_512

Official hyper-parameters: batch 768, 350 epochs, tblr 8e-05, alng 5e-06, wpe 0.01, twde 0.08, shared AdaLN;
bfloat16, lin0 schedule, twd 0.05, tclip 2.0, no label smoothing, class dropout 0.1 (the defaults of ``var_run``).
Parameters and Adam state are split over fsdp=8 devices (mesh ``(('data', -1), ('fsdp', 8), ('tensor', 1))``,
blocks scanned and rematerialised); with other device counts override it, e.g.
``--config.mesh="(('data', -1), ('fsdp', 4), ('tensor', 1))"``.
``configs/var_d36.py:runlocal`` is a few-step smoke test of the same model on the embedded shapes data
(still needs an official-shaped tokenizer directory).
"""

from varjax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, runlocal=False)
    return common.official_var(
        36,
        batch_size=768,
        epochs=350,
        tblr=8e-05,
        alng=5e-06,
        wpe=0.01,
        twde=0.08,
        shared_aln=True,
        tokenizer_dir="runs/tok_vae_ch160v4096z32_512",
        fsdp=8,  # ~35 GB of parameters and Adam state would not fit replicated on one device
        remat="full",
        runlocal_=a.runlocal,
    )
