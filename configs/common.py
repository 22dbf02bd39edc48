"""Every config field and its default, in one place: the recipes in this folder start from these functions.

A config file defines ``get_config(arg)`` (``arg`` is the text after ':' in ``--config configs/x.py:arg``) and
builds on :func:`base`, :func:`var`, :func:`tokenizer`, :func:`kl_tokenizer` or :func:`ecar`; a sweep file also
defines ``sweep(add)``. Config files import only this module (no trainer, no TensorFlow). ``varjax.config``
loads them, applies ``--config.field=value`` overrides (unknown fields are refused) and derives everything a run
uses (steps, warm-up, model width, data source, mesh) once, in ``varjax.config.resolve``.
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from varjax.core.mesh import DEFAULT_MESH, RULES
from varjax.core.optim import REFERENCE_NOWD_KEYS
from varjax.models.kl_ae import KLAEConfig
from varjax.models.vqvae import VQVAEConfig

# ---------------------------------------------------------------------------------------- config-file arguments


def _literal(text: str) -> Any:
    """Python literal if ``text`` is one ('3', '1e-4', 'None'), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(key: str, text: str, typ: type | None) -> Any:
    if typ is None:
        return _literal(text)
    try:
        if typ is bool:
            return _parse_bool(text)
        if typ in (tuple, list):
            # Sequences are written with '+' inside the comma-separated argument: 'pn=1+2+3'.
            return typ(_literal(t) for t in text.split("+") if t)
        return typ(text)
    except ValueError as e:
        raise ValueError(
            f"Config argument `{key}={text}` could not be read as {typ.__name__} ({e}); "
            f"write e.g. `{key}=...` with a {typ.__name__} value."
        ) from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config-file argument like 'depth=16,runlocal' into a typed ConfigDict.

    Each keyword gives a default value, or a ``(default, type)`` pair when the default is None or its type is
    not the wanted one. Values are converted to the default's type (bool accepts True/False/1/0/yes/no; tuples
    are written 'a+b+c'). A bare word is ``word=True`` if it is a known key, otherwise the value of the first key
    (so 'configs/var.py:16' can mean depth=16). ``member=NAME`` is always accepted (a sweep member, applied by
    the loader).

    Raises:
      ValueError: for an unknown key, a malformed pair or a value of the wrong type.
    """
    spec = {"member": ("", str)}
    for key, value in defaults.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], type):
            spec[key] = value
        else:
            spec[key] = (value, None if value is None else type(value))
    result = ml_collections.ConfigDict({k: v for k, (v, _) in spec.items()}, type_safe=False)
    arg = (arg or "").strip()
    if arg and "," not in arg and "=" not in arg:
        first = next((k for k in spec if k != "member"), None)
        arg = f"{arg}=True" if arg in spec or first is None else f"{first}={arg}"
    for item in filter(None, (s.strip() for s in arg.split(","))):
        key, _, text = item.partition("=") if "=" in item else (item, "", "True")
        key, text = key.strip(), text.strip()
        if key not in spec:
            raise ValueError(
                f"Unknown config argument `{key}` in '{arg}'; this config file accepts "
                f"{sorted(k for k in spec if k != 'member')} (write them as 'key=value,key2=value2')."
            )
        result[key] = _convert(key, text, spec[key][1])
    return result


def _typed(value, typ: type) -> ml_collections.FieldReference:
    """A field that may hold None and is overridden with a value of ``typ``."""
    return ml_collections.FieldReference(value, field_type=typ)


# ----------------------------------------------------------------------------------------------- every run


def data() -> ml_collections.ConfigDict:
    """The input pipeline's fields (``config.data``): the embedded 32x32 shapes by default."""
    return ml_collections.ConfigDict({
        "name": "varjax_shapes/32",  # TFDS name, or 'folder'
        "data_dir": _typed(None, str),  # TFDS data dir (None: TFDS default, ~/tensorflow_datasets)
        "manual_dir": _typed(None, str),  # where the imagenet2012 archives were downloaded by hand
        "folder": _typed(None, str),  # root with train/ and val/ class folders, for name='folder'
        "train_split": "train",
        "eval_split": "test",
        "hflip": False,
        "mid_reso": 1.125,  # resize the short side to round(mid_reso * image_size) before cropping
        "shuffle_buffer": 10_000,  # examples; a buffer >= the shard size gives a uniform shuffle
        "cache": False,  # keep the encoded TFDS records in memory (small datasets)
        "tokens_cache": _typed(None, str),  # a token cache directory (VAR): training then reads tokens
        "num_shards": 0,  # data shards of the training split (0: one per process)
    })


def optimizer() -> ml_collections.ConfigDict:
    """AdamW of the reference (VAR ``utils/arg_util.py`` defaults); see ``varjax.core.optim``."""
    return ml_collections.ConfigDict(dict(
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        sche=_typed(None, str),  # None: 'lin0', or 'lin<pg>' with progressive training (the official rule)
        wp0=0.005,
        wpe=0.01,
        warmup_steps=_typed(None, int),
        warmup_epochs=_typed(None, float),
        warmup_examples=_typed(None, int),
        warmup_fraction=_typed(0.02, float),  # the reference warms up for ep/50 epochs, i.e. 2% of training
        twd=0.05,
        twde=0.0,
        tclip=2.0,
        ac=1,
        nowd_keys=REFERENCE_NOWD_KEYS,
    ))


def base(task: str) -> ml_collections.ConfigDict:
    """The fields of every run."""
    c = ml_collections.ConfigDict()
    c.task = task  # "tokenizer", "var" or "ecar" (varjax.tasks)
    c.seed = 0
    c.batch_size = 768
    c.total_epochs = _typed(None, float)  # exactly one of total_{epochs,steps,examples}
    c.total_steps = _typed(None, int)
    c.total_examples = _typed(None, int)
    # End this run after this step (saving it) while the schedule still spans the whole run: a later run with
    # the same config resumes and continues, e.g. one queue slot of a long job (None: run to the end).
    c.stop_at_step = _typed(None, int)
    c.mesh = tuple(DEFAULT_MESH)
    c.rules = list(RULES)  # logical axis -> mesh axis, for parameters and activations
    # Multi-process settings; None = detected from the launcher's environment (varjax.core.distributed).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = _typed(None, str)
    c.distributed.num_processes = _typed(None, int)
    c.distributed.process_id = _typed(None, int)
    c.log_every = 50
    c.ckpt_every = 1000
    c.keep_ckpts = 3
    c.async_ckpt = True
    c.eval_every = 0
    c.progress_every_s = 10.0
    c.init_from = ""  # a model directory or workdir whose weights start a fresh run
    c.ema_decay = 0.0  # EMA of the trained weights (0: off); sampling then uses it (--no-ema: the raw weights)
    c.compile_cache = _typed(None, str)  # persistent compilation cache directory ("off": none; None: default)
    c.profile_steps = ()  # (first, last): a jax.profiler trace of those steps under WORKDIR/profile
    c.profile_all_processes = False  # trace every process, not only process 0
    c.peak_tflops = _typed(None, float)  # peak TFLOP/s per device for the mfu metric (None: known devices only)
    c.latents_cache = _typed(None, str)  # a latent cache directory (E-CAR): training then reads latents
    c.data = data()
    c.opt = optimizer()
    return c


def runlocal(c: ml_collections.ConfigDict, steps: int = 4) -> ml_collections.ConfigDict:
    """A few steps on the tiny embedded dataset, logging and saving every step or two: a smoke test."""
    c.data.name = "varjax_shapes/tiny"
    c.data.eval_split = "test"
    c.total_epochs = None
    c.total_examples = None
    c.total_steps = steps
    c.batch_size = 8
    c.log_every = 1
    c.ckpt_every = 2
    return c


# ----------------------------------------------------------------------------------------------- tokenizers


VQ_FIELDS = ("ch", "ch_mult", "z_channels", "vocab_size", "num_res_blocks", "using_sa", "using_mid_sa", "patch_nums",
             "num_groups", "beta", "using_znorm", "quant_resi", "share_quant_resi", "dropout")


def tokenizer(model_type: str = "vq") -> ml_collections.ConfigDict:
    """A tokenizer run: the multi-scale VQ-VAE (``model_type='vq'``) or E-CAR's KL autoencoder (``'kl'``), the
    same VQGAN-style objective (reconstruction, the quantizer or KL term, optional LPIPS and PatchGAN)."""
    c = base("tokenizer")
    c.model_type = model_type
    if model_type == "vq":  # defaults: the released vae_ch160v4096z32
        c.vae = ml_collections.ConfigDict({k: v for k, v in VQVAEConfig().to_dict().items() if k in VQ_FIELDS})
        c.vq_weight = 1.0
        c.usage_decay = 0.99
        c.reinit_dead_codes = False
        c.dead_code_threshold = 0.01
        c.dead_code_every = 200
    elif model_type == "kl":
        c.vae = ml_collections.ConfigDict(KLAEConfig().to_dict())
        c.kl_weight = 1e-6
        # extra latent noise the decoder learns to remove: per example, Gaussian of a standard deviation drawn
        # uniformly in [0, decoder_noise] times the batch's latent standard deviation (0: off)
        c.decoder_noise = 0.0
    else:
        raise ValueError(f"config.model_type={model_type!r}: expected 'vq' or 'kl'.")
    c.require_init_from = False  # the recipe fine-tunes: config.init_from must name the tokenizer
    c.freeze = ()  # top-level parameter groups kept as they start (e.g. ("encoder",): train the decoder only)
    c.lr = 1e-4  # peak learning rate (absolute)
    c.l1_weight = 1.0
    c.l2_weight = 1.0
    c.lpips_weight = 0.0
    c.lpips_lin_path = ""
    c.lpips_vgg_path = ""
    c.disc_weight = 0.0
    c.disc_start = 0
    c.disc_loss = "hinge"
    c.adaptive_disc_weight = True
    c.disc = ml_collections.ConfigDict(dict(ndf=64, n_layers=3, norm="group"))
    c.disc_lr = 1e-4
    c.disc_b1 = 0.5
    c.disc_b2 = 0.9
    c.ema_decay = 0.999
    c.image_every = 0
    c.image_count = 8
    c.opt.twd = 0.0
    c.opt.twde = 0.0
    c.opt.b1, c.opt.b2 = 0.9, 0.99
    c.opt.tclip = 1.0
    c.opt.sche = "cos"
    c.opt.wpe = 0.1
    return c


def kl_tokenizer() -> ml_collections.ConfigDict:
    return tokenizer("kl")


# ---------------------------------------------------------------------------------------------- generators


def _generator(task: str) -> ml_collections.ConfigDict:
    c = base(task)
    c.tokenizer_dir = ""  # a model directory from `varjax convert` or `varjax train-tokenizer`
    c.tblr = 1e-4  # lr = tblr * batch_size / 256
    c.opt.twd, c.opt.twde, c.opt.wp0, c.opt.wpe, c.opt.tclip = 0.05, 0.0, 0.005, 0.01, 2.0
    c.data.name = "imagenet2012"
    c.data.eval_split = "validation"
    return c


def var(depth: int) -> ml_collections.ConfigDict:
    """The reference's VAR defaults (``utils/arg_util.py``) for ``depth``; width, heads and drop path follow the
    release's rules (64 * depth, depth, 0.1 * depth / 24) unless set."""
    c = _generator("var")
    c.ls = 0.0  # label smoothing
    c.pg = 0.0  # progressive training over the first pg fraction of steps (0: off)
    c.pg0 = 4
    c.pgwp = 0.0  # warm-up epochs of each new scale's loss weight (0: total_epochs / 300)
    c.model = ml_collections.ConfigDict(dict(
        depth=depth,
        embed_dim=_typed(None, int),
        num_heads=_typed(None, int),
        drop_path_rate=_typed(None, float),
        num_classes=_typed(None, int),
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
    ))
    return c


def official_var(depth: int, *, batch_size: int, epochs: float, tblr: float, alng: float, wpe: float,
                 tokenizer_dir: str, twde: float = 0.0, shared_aln: bool = False, fsdp: int = 1, remat: str = "none",
                 runlocal_: bool = False) -> ml_collections.ConfigDict:
    """A released VAR recipe on ImageNet (the README's hyper-parameters; everything else :func:`var`'s).

    Blocks are scanned (``scan_layers``): one block is compiled instead of ``depth``, with ``remat`` as given.
    ``fsdp`` > 1 splits parameters and optimizer state over that many devices. ``runlocal_`` keeps the model but
    trains 2 steps of batch 8 on the embedded shapes data (it still needs an official-shaped tokenizer
    directory), with fsdp over every device.
    """
    c = var(depth)
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
        c.mesh = (("data", 1), ("fsdp", -1), ("tensor", 1)) if runlocal_ else (("data", -1), ("fsdp", fsdp),
                                                                                  ("tensor", 1))
    c.model.scan_layers = True
    c.model.remat = remat
    if runlocal_:
        runlocal(c, steps=2)
    return c


def ecar(depth: int) -> ml_collections.ConfigDict:
    """Defaults of an E-CAR run (VAR's optimizer recipe; model fields of ``varjax.models.ecar.ECARConfig``)."""
    c = _generator("ecar")
    c.stats_examples = 1024  # training latents that measure the latent shift and scale (unless set)
    c.all_stages = False  # False: one stage per example (the stage-sampling objective); True: every stage
    c.model = ml_collections.ConfigDict(dict(
        depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
        num_classes=_typed(None, int),
        patch_nums=_typed(None, tuple),
        stage_starts=(), attn_l2_norm=True, cond_drop_rate=0.1, mlp_ratio=4.0, head_width=64 * depth,
        head_depth=6, time_dim=256, latent_shift=0.0, latent_scale=0.0, dtype="bfloat16",
        # the flow network: "mlp" (MAR's per-token head of head_depth blocks) or "dit" (varjax.models.flow_dit: a
        # DiT of flow_depth blocks and flow_heads heads over the stage's whole map, width head_width)
        flow_net="mlp", flow_depth=2, flow_heads=2, flow_mlp_ratio=4.0,
        stage_input="noisy",  # what the transformer reads for stage s >= 1: the "noisy" stage end or "clean" x_hat
    ))
    # defaults of `varjax sample` on the model directory (stage_cfg / stage_steps: one guidance scale / step count
    # per stage, or empty)
    c.sample = ml_collections.ConfigDict(dict(cfg=3.0, steps=8, solver="euler", temperature=1.0, stage_cfg=(),
                                              stage_steps=()))
    return c


def imagenet_ecar(depth: int, *, batch_size: int, epochs: float, tblr: float, head_depth: int, tokenizer_dir: str,
                  runlocal_: bool = False) -> ml_collections.ConfigDict:
    """E-CAR on ImageNet 256px at a VAR-comparable size: VAR-d``depth``'s transformer, a flow head as wide as the
    transformer, stages 1-2-4-8-16 on a 16x16 continuous latent (``configs/ecar_tokenizer_imagenet.py``), VAR's
    optimizer recipe. ``runlocal_`` keeps the model but trains 2 steps of batch 8 on the embedded shapes data (it
    still needs a 256px continuous tokenizer directory)."""
    c = ecar(depth)
    c.tokenizer_dir = tokenizer_dir
    c.batch_size = batch_size
    c.total_epochs = float(epochs)
    c.tblr = tblr
    c.model.head_depth = head_depth
    c.model.patch_nums = (1, 2, 4, 8, 16)
    c.opt.wpe = 0.1
    if runlocal_:
        runlocal(c, steps=2)
        c.stats_examples = 64
    return c
