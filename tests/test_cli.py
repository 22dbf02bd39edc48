"""End-to-end model commands on the reference checkpoints: convert, sample, tokenize, reconstruct, edit."""

import json

import numpy as np
import pytest
from PIL import Image

from varjax.cli import main

PN = "1,2,3,4,6,8"


@pytest.fixture(scope="module")
def model_dir(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "model"
    main(
        [
            "convert",
            "--vae",
            str(golden_dir / "vqvae_public.pth"),
            "--var",
            str(golden_dir / "var_public.pth"),
            "--patch-nums",
            PN,
            "--out",
            str(out),
        ]
    )
    return out


def test_convert_writes_config(model_dir):
    meta = json.loads((model_dir / "varjax_model.json").read_text())
    assert meta["var"]["config"]["depth"] == 2 and meta["vae"]["config"]["vocab_size"] == 256
    assert tuple(meta["vae"]["config"]["patch_nums"]) == (1, 2, 3, 4, 6, 8)


def test_sample_greedy_matches_reference(model_dir, golden_dir, tmp_path):
    g = np.load(golden_dir / "io_public.npz")
    main(
        [
            "sample",
            "--ckpt",
            str(model_dir),
            "--labels",
            "3,7",
            "--cfg",
            "1.5",
            "--top-k",
            "1",
            "--top-p",
            "0",
            "--out",
            str(tmp_path / "grid.png"),
            "--save-npz",
            str(tmp_path / "s.npz"),
        ]
    )
    z = np.load(tmp_path / "s.npz")
    assert z["images"].dtype == np.float32 and z["images"].shape == (2, 128, 128, 3)
    assert z["tokens"].dtype == np.int32
    np.testing.assert_array_equal(z["tokens"], g["sample_idx_BL"])
    np.testing.assert_allclose(z["images"], g["sample_img"].transpose(0, 2, 3, 1), atol=1e-3)
    assert Image.open(tmp_path / "grid.png").size[0] > 256


def test_tokenize_and_reconstruct_from_npy_and_folder(model_dir, golden_dir, tmp_path):
    g = np.load(golden_dir / "io_public.npz")
    imgs01 = (g["img"].transpose(0, 2, 3, 1) + 1) / 2
    np.save(tmp_path / "imgs.npy", imgs01.astype(np.float32))
    main(
        ["tokenize", "--ckpt", str(model_dir), "--images", str(tmp_path / "imgs.npy"), "--out", str(tmp_path / "t.npz")]
    )
    np.testing.assert_array_equal(np.load(tmp_path / "t.npz")["tokens"], g["idx_BL"])
    main(
        [
            "reconstruct",
            "--ckpt",
            str(model_dir),
            "--images",
            str(tmp_path / "imgs.npy"),
            "--out",
            str(tmp_path / "r.npz"),
        ]
    )
    rec = np.load(tmp_path / "r.npz")["images"]
    np.testing.assert_allclose(rec, (g["recon_last"].transpose(0, 2, 3, 1) + 1) / 2, atol=1e-3)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(imgs01):
        Image.fromarray((im * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    main(["tokenize", "--ckpt", str(model_dir), "--images", str(folder), "--out", str(tmp_path / "t2.npz")])
    assert np.load(tmp_path / "t2.npz")["tokens"].shape == g["idx_BL"].shape


def test_edit_teacher_forces_tokens_outside_the_mask(model_dir, golden_dir, tmp_path):
    import jax
    import jax.numpy as jnp

    from varjax.core.model_dir import load_model_dir
    from varjax.sampling.var import SampleOptions, keep_masks, make_sampler, mask_to_keep

    g = np.load(golden_dir / "io_public.npz")
    img = ((g["img"][0].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255  # in-paint the centre
    Image.fromarray(mask).save(tmp_path / "mask.png")
    main(
        [
            "edit",
            "--ckpt",
            str(model_dir),
            "--image",
            str(tmp_path / "in.png"),
            "--mask",
            str(tmp_path / "mask.png"),
            "--label",
            "3",
            "--out",
            str(tmp_path / "out.png"),
        ]
    )
    assert Image.open(tmp_path / "out.png").size == (128, 128)

    b = load_model_dir(model_dir)
    keep = jnp.asarray(mask_to_keep(mask > 127, 8))[None]
    gt = jnp.asarray(g["idx_BL"][:1])
    editor = make_sampler(b.tok_cfg, b.gen_cfg, SampleOptions(cfg=1.5, top_k=0, top_p=0.0))
    _, tokens = editor(b.tok_params, b.gen_params, jnp.asarray([7], jnp.int32), jax.random.PRNGKey(1), gt, keep)
    kept = np.concatenate([np.asarray(m) for m in keep_masks(keep, b.gen_cfg.patch_nums)], axis=1)
    assert kept[0, :1].all() and not kept[0, -64:].all() and kept[0, -64:].any()
    np.testing.assert_array_equal(np.asarray(tokens)[kept], np.asarray(gt)[kept])
    assert (np.asarray(tokens)[~kept] != np.asarray(gt)[~kept]).any()  # free sampling over 256 codes


def test_bad_inputs_give_clear_errors(model_dir, tmp_path, capsys):
    def error_of(argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "out of range" in error_of(
        ["sample", "--ckpt", str(model_dir), "--labels", "99", "--out", str(tmp_path / "g.png")]
    )
    assert "varjax_model.json" in error_of(
        ["sample", "--ckpt", str(tmp_path), "--labels", "1", "--out", str(tmp_path / "g.png")]
    )
    np.save(tmp_path / "bad.npy", np.full((1, 128, 128, 3), 7.0, np.float32))
    assert "[0, 1]" in error_of(
        ["tokenize", "--ckpt", str(model_dir), "--images", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "x")]
    )
