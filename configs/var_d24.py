"""VAR-d24 on ImageNet 256px, the official recipe.

    varjax train --config configs/var_d24.py --workdir runs/var_d24 \
        --config.tokenizer_dir=runs/tok_vae_ch160v4096z32

The tokenizer is the released ``vae_ch160v4096z32`` converted once with::

    varjax convert --vae vae_ch160v4096z32.pth --out runs/tok_vae_ch160v4096z32

Official hyper-parameters: batch 768, 350 epochs, tblr 8e-05, alng 0.0001, wpe 0.01; bfloat16, lin0 schedule,
twd 0.05, tclip 2.0, no label smoothing, class dropout 0.1 (the defaults of ``var_run``).
``configs/var_d24.py:runlocal`` is a few-step smoke test of the same model on the embedded shapes data
(still needs an official-shaped tokenizer directory).
"""

from varjax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, runlocal=False)
    return common.official_var(
        24,
        batch_size=768,
        epochs=350,
        tblr=8e-05,
        alng=0.0001,
        wpe=0.01,
        tokenizer_dir="runs/tok_vae_ch160v4096z32",
        runlocal_=a.runlocal,
    )
