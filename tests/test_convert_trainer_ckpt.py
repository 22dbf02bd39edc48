"""`varjax convert --var ar-ckpt-last.pth`: the official trainer's checkpoint, read without torch.

The checkpoints here are built from the reference weights with the structure the official train.py saves::

    torch.save({'epoch': ep + 1, 'iter': 0, 'trainer': VARTrainer.state_dict(), 'args': Args.state_dict()}, path)

VARTrainer.state_dict() is {'config', 'var_wo_ddp', 'vae_local', 'var_opt'}, var_opt is AmpOptimizer.state_dict()
({'scaler': GradScaler state (fp16 runs), 'optimizer': fused AdamW state}) and Args.state_dict() the OrderedDict
of the command-line args. They are written by `save_torch_pickle` with storages tagged 'cuda:0', as a GPU run
saves them.
"""

import json
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from varjax.cli import main
from varjax.core import model_dir as ckpt
from varjax.interop import convert
from varjax.interop.torch_io import UnsafeCheckpointError, load_state_dict, save_torch_pickle

PN = (1, 2, 3, 4, 6, 8)  # the reference weights' scales (not an official schedule: convert cannot infer them)
EPOCH = 10
# Buffers of the official VAR (not parameters, so not in the optimizer) and the no-weight-decay names of
# train.py's filter_params.
BUFFERS = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")
NOWD_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
             "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")  # fmt: skip


def official_args(**overrides) -> OrderedDict:
    """Args.state_dict() (utils/arg_util.py) of a finished epoch: every class variable but 'device'."""
    args = OrderedDict(
        data_path="/datasets/imagenet", exp_name="text", vfast=0, tfast=2, depth=2, ini=-1.0, hd=0.02, aln=0.5,
        alng=1e-5, fp16=1, tblr=1e-4, tlr=2e-4, twd=0.05, twde=0.05, tclip=2.0, ls=0.0, bs=512, batch_size=64,
        glb_batch_size=512, ac=1, ep=250, wp=5.0, wp0=0.005, wpe=0.01, sche="lin0", opt="adamw", afuse=True,
        saln=False, anorm=True, fuse=True, pn="_".join(map(str, PN)), patch_size=16, patch_nums=PN,
        resos=tuple(16 * p for p in PN), data_load_reso=128, mid_reso=1.125, hflip=False, workers=10, pg=0.0,
        pg0=4, pgwp=0.833, cmd="--depth=2 --bs=512 --fp16=1", branch="main", commit_id="0" * 40,
        commit_msg="init", acc_mean=3.1, acc_tail=2.0, L_mean=5.2, L_tail=5.5, vacc_mean=2.9, vacc_tail=1.9,
        vL_mean=5.3, vL_tail=5.6, grad_norm=1.25, cur_lr=1.9e-4, cur_wd=0.05, cur_it="2502/2502",
        cur_ep=f"{EPOCH}/250", remain_time="3 days", finish_time="12-31 23:59", local_out_dir_path="/out",
        tb_log_dir_path="/out/tb-VARd2", log_txt_path="/out/log.txt", last_ckpt_path="/out/ar-ckpt-last.pth",
        tf32=True, seed=None, same_seed_for_all_ranks=0, local_debug=False, dbg_nan=False,
    )  # fmt: skip
    args.update(overrides)
    return args


def adamw_state(var_sd: dict, steps: int = 3) -> dict:
    """torch.optim.AdamW(param_groups, betas=(0.9, 0.95), fused=True).state_dict() after `steps` steps:
    Adam moments per parameter (keyed by index) and filter_params' two groups (then lr_wd_annealing)."""
    rng = np.random.default_rng(0)
    groups, state = {}, {}
    params = [(k, v) for k, v in var_sd.items() if not any(b in k for b in BUFFERS)]
    for i, (name, value) in enumerate(params):
        nowd = value.ndim == 1 or name.endswith("bias") or any(k in name for k in NOWD_KEYS)
        groups.setdefault("ND" if nowd else "D", {"wd_sc": 0.0 if nowd else 1.0, "params": []})["params"].append(i)
        state[i] = {
            "step": np.array(steps, np.float32),
            "exp_avg": rng.normal(0, 1e-3, value.shape).astype(np.float32),
            "exp_avg_sq": rng.uniform(0, 1e-6, value.shape).astype(np.float32),
        }
    param_groups = [
        {"wd_sc": g["wd_sc"], "lr_sc": 1.0, "lr": 1.9e-4, "betas": (0.9, 0.95), "eps": 1e-08,
         "weight_decay": 0.05 * g["wd_sc"], "amsgrad": False, "maximize": False, "foreach": None,
         "capturable": False, "differentiable": False, "fused": True, "decoupled_weight_decay": True,
         "params": g["params"]}
        for g in groups.values()
    ]  # fmt: skip
    return {"state": state, "param_groups": param_groups}


def official_trainer_checkpoint(var_sd: dict, vae_sd: dict | None, args: OrderedDict | None = None) -> dict:
    """The object train.py saves as ar-ckpt-last.pth (`vae_sd` None: a trainer built without a tokenizer)."""
    args = official_args() if args is None else args
    trainer = {
        "config": {"patch_nums": args["patch_nums"], "resos": args["resos"], "label_smooth": args["ls"],
                   "prog_it": 0, "last_prog_si": -1, "first_prog": True},  # fmt: skip
        "var_wo_ddp": OrderedDict(var_sd),
        "vae_local": OrderedDict(vae_sd) if vae_sd is not None else None,
        "var_opt": {
            "scaler": {"scale": 2048.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1000,
                       "_growth_tracker": 117},  # fmt: skip
            "optimizer": adamw_state(var_sd),
        },
    }
    if vae_sd is None:
        del trainer["vae_local"]  # VARTrainer.state_dict() skips modules that are None
    return {"epoch": EPOCH, "iter": 0, "trainer": trainer, "args": args}


@pytest.fixture(scope="module")
def golden_sds(golden_dir):
    return load_state_dict(golden_dir / "var_public.pth"), load_state_dict(golden_dir / "vqvae_public.pth")


@pytest.fixture(scope="module")
def trainer_ckpt(golden_sds, tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "ar-ckpt-last.pth"
    save_torch_pickle(path, official_trainer_checkpoint(*golden_sds), location="cuda:0")
    return path


@pytest.fixture(scope="module")
def plain_model_dir(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "model"
    pn = ",".join(map(str, PN))
    main(["convert", "--vae", str(golden_dir / "vqvae_public.pth"), "--var", str(golden_dir / "var_public.pth"),
          "--patch-nums", pn, "--out", str(out)])  # fmt: skip
    return out


def _flat_params(model_dir, which):
    import flax

    return flax.traverse_util.flatten_dict(ckpt.load_params(model_dir, which))


def assert_same_model_dir(a, b):
    """Same varjax_model.json apart from the recorded sources, and bit-identical parameter arrays."""
    meta_a, meta_b = (json.loads((d / ckpt.MODEL_JSON).read_text()) for d in (a, b))
    assert meta_a.pop("source") != meta_b.pop("source")
    assert meta_a == meta_b
    for which in ("vae", "var"):
        pa, pb = _flat_params(a, which), _flat_params(b, which)
        assert list(pa) == list(pb)
        for path in pa:
            x, y = np.asarray(pa[path]), np.asarray(pb[path])
            assert (x.dtype, x.shape) == (y.dtype, y.shape), path
            assert x.tobytes() == y.tobytes(), path


def test_trainer_checkpoint_converts_without_vae_like_plain_state_dicts(trainer_ckpt, plain_model_dir, tmp_path,
                                                                         capsys):  # fmt: skip
    out = tmp_path / "from_trainer"
    main(["convert", "--var", str(trainer_ckpt), "--out", str(out)])  # no --vae, no --patch-nums
    printed = capsys.readouterr().out
    assert f"official trainer checkpoint, epoch {EPOCH}, iter 0" in printed
    assert "depth=2 pn='1_2_3_4_6_8' patch_nums=(1, 2, 3, 4, 6, 8) saln=False anorm=True fp16=1" in printed
    assert "patch_nums 1,2,3,4,6,8 from the checkpoint" in printed
    assert "tokenizer: stored in the file under trainer.vae_local" in printed
    assert_same_model_dir(out, plain_model_dir)
    source = json.loads((out / ckpt.MODEL_JSON).read_text())["source"]
    assert source == {"vae": str(trainer_ckpt), "var": str(trainer_ckpt), "var_key": "trainer.var_wo_ddp",
                      "epoch": EPOCH, "iter": 0, "vae_key": "trainer.vae_local"}  # fmt: skip


def test_explicit_vae_wins_over_the_stored_one(golden_sds, golden_dir, plain_model_dir, tmp_path, capsys):
    var_sd, vae_sd = golden_sds
    other_vae = {k: v + 1 if v.dtype.kind == "f" else v for k, v in vae_sd.items()}  # same shapes, other weights
    path = tmp_path / "ar-ckpt-best.pth"
    save_torch_pickle(path, official_trainer_checkpoint(var_sd, other_vae))
    out = tmp_path / "model"
    main(["convert", "--var", str(path), "--vae", str(golden_dir / "vqvae_public.pth"), "--out", str(out)])
    assert "used instead of the tokenizer stored in" in capsys.readouterr().out
    assert_same_model_dir(out, plain_model_dir)


def test_trainer_checkpoint_without_tokenizer_needs_vae(golden_sds, tmp_path, capsys):
    path = tmp_path / "ar-ckpt-last.pth"
    save_torch_pickle(path, official_trainer_checkpoint(golden_sds[0], None))
    with pytest.raises(SystemExit) as e:
        main(["convert", "--var", str(path), "--out", str(tmp_path / "model")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is an official trainer checkpoint (epoch {EPOCH}) without the tokenizer")
    assert "--vae" in err and err.count("\n") == 1  # one paragraph, no traceback
    assert not (tmp_path / "model").exists()


def test_plain_state_dict_without_vae_names_the_flag(golden_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--var", str(golden_dir / "var_public.pth"), "--out", str(tmp_path / "m")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("error: --vae is required: ")


def _binunicode(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _replace_in_pickle(path, old: bytes, new: bytes) -> None:
    """Rewrites the archive with `old` replaced by `new` in its data.pkl (once)."""
    with zipfile.ZipFile(path) as z:
        records = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in records:
            if info.filename.endswith("/data.pkl"):
                assert data.count(old) == 1
                data = data.replace(old, new)
            z.writestr(info, data)


def test_trainer_checkpoint_with_a_disallowed_global_is_refused(golden_sds, tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "ar-ckpt-last.pth"
    save_torch_pickle(path, official_trainer_checkpoint(*golden_sds, args=official_args(seed="SEED")))
    # args['seed'] becomes os.system('touch <marker>'): what a crafted checkpoint would hide among the args
    call = b"cos\nsystem\n(" + _binunicode(f"touch {marker}") + b"tR"  # GLOBAL MARK ... TUPLE REDUCE
    _replace_in_pickle(path, _binunicode("SEED"), call)
    with pytest.raises(UnsafeCheckpointError, match=r"ar-ckpt-last\.pth.*'os\.system'"):
        convert.read_trainer_checkpoint(path)
    with pytest.raises(SystemExit) as e:
        main(["convert", "--var", str(path), "--out", str(tmp_path / "model")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "'os.system'" in err and "nothing from the file was executed" in err
    assert not marker.exists() and not (tmp_path / "model").exists()


def test_reads_only_what_it_needs(trainer_ckpt, golden_sds):
    full = convert.read_trainer_checkpoint(trainer_ckpt)
    assert (full.epoch, full.iter, full.patch_nums, full.has_vae) == (EPOCH, 0, PN, True)
    assert full.args == official_args() and type(full.args["patch_nums"]) is tuple
    assert full.config["resos"] == (16, 32, 48, 64, 96, 128)
    for got, want in zip((full.var_sd, full.vae_sd), golden_sds, strict=True):
        assert list(got) == list(want)
        assert all(got[k].tobytes() == want[k].tobytes() for k in want)
    assert convert.read_trainer_checkpoint(trainer_ckpt, read_vae=False).vae_sd is None
    golden = trainer_ckpt.parent / "plain.pth"
    save_torch_pickle(golden, OrderedDict(golden_sds[0]))
    assert convert.read_trainer_checkpoint(golden) is None  # a plain state dict is not a trainer checkpoint


def test_patch_nums_from_pn_or_trainer_config():
    def pn_of(args, config=None):
        return convert.TrainerCheckpoint("f", {}, None, False, 1, 0, args, config or {}).patch_nums

    assert pn_of({"pn": "256"}) == convert.PN_ALIASES["256"]
    assert pn_of({"pn": "1-2-3"}) == (1, 2, 3)
    assert pn_of({"patch_nums": None, "pn": "1_2_4"}) == (1, 2, 4)
    assert pn_of({}, {"patch_nums": (1, 2)}) == (1, 2)
    assert pn_of({"pn": "big"}) is None


def test_disagreeing_args_are_noted():
    ck = convert.TrainerCheckpoint("f", {}, None, False, 1, 0, {"depth": 16, "saln": False, "anorm": True}, {})
    cfg = convert.VARConfig(depth=2, embed_dim=128, num_heads=2, attn_l2_norm=True, shared_aln=False)
    (note,) = ck.disagreements(cfg)
    assert "depth=16" in note and "2" in note


def test_wrapper_prefixes_are_stripped():
    w = np.zeros(2, np.float32)
    assert convert.strip_wrapper_prefixes({"module._orig_mod.a": w, "module._orig_mod.b": w}) == (
        {"a": w, "b": w},
        "module._orig_mod.",
    )
    assert convert.strip_wrapper_prefixes({"module.a": w, "b": w})[1] == ""  # only when every key has it
    assert convert.strip_wrapper_prefixes({})[1] == ""
