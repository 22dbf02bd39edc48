"""E-CAR at VAR-d16's size on ImageNet 256px.

    varjax train --config configs/ecar_d16.py --workdir runs/ecar_d16 \
        --config.tokenizer_dir=runs/ecar_tok_imagenet --config.data.manual_dir=/data/imagenet

The continuous tokenizer (16x16x16 latents) is trained first with::

    varjax train-tokenizer --config configs/ecar_tokenizer_imagenet.py --workdir runs/ecar_tok_imagenet

Transformer as VAR-d16 (width 1024, 16 heads), flow head of width 1024 and 6 blocks, stages
1-2-4-8-16, batch 768, 200 epochs, VAR's optimizer recipe (tblr 1e-4, lin0, twd 0.05, tclip 2, class dropout
0.1), bfloat16. configs/ecar_d16.py:runlocal is a two-step smoke test of the same model on the embedded data.
"""

from varjax.configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, runlocal=False)
    return common.imagenet_ecar(16, batch_size=768, epochs=200, tblr=1e-4, head_depth=6,
                             tokenizer_dir="runs/ecar_tok_imagenet", runlocal_=a.runlocal)
