"""The distribution metric on hand-made sets: identical sets, a repeated image, one hue, one class."""

import colorsys

import numpy as np
import pytest

from varjax.data.shapes import NUM_CLASSES, classify_shapes, coverage, draw_example
from varjax.eval import shape_metrics as sm

SIZE, N_REF, N_GEN = 32, 120, 48


@pytest.fixture(scope="module")
def real():
    r1, r2 = sm.held_out_sets(N_REF, N_GEN, SIZE)
    return r1, r2, sm.image_features(r1), sm.image_features(r2)


def _drawn(n: int, seed: int, hue: float | None = None, label: int | None = None) -> np.ndarray:
    """n uint8 images drawn like the dataset (sizes, positions, colour ranges) on plain backgrounds, with an
    optional fixed shape hue or class."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = i % NUM_CLASSES if label is None else label
        side = rng.uniform(0.35, 0.70)
        x0, y0 = rng.uniform(0.08, 0.92 - side, size=2)
        h = rng.uniform() if hue is None else hue
        fg = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0)))
        if rng.uniform() < 0.5:
            bg = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.6), rng.uniform(0.05, 0.35)))
        else:
            bg = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.8, 1.0)))
        a = coverage(lab, SIZE, x0, y0, side)[..., None]
        out.append(np.floor((bg * (1 - a) + fg * a) * 255 + 0.5).astype(np.uint8))
    return np.stack(out)


def test_held_out_sets_are_disjoint_test_images():
    r1, r2 = sm.held_out_sets(4, 3, 16)
    assert r1.shape == (4, 16, 16, 3) and r2.shape == (3, 16, 16, 3) and r1.dtype == np.uint8
    np.testing.assert_array_equal(r2[0], draw_example(4, "test", 16)[0])
    with pytest.raises(ValueError, match="test images"):
        sm.held_out_sets(600, 601, 16)


def test_features_of_real_images_read_their_class(real):
    r1, _, f1, _ = real
    labels = np.arange(N_REF) % NUM_CLASSES
    assert f1.shape == (N_REF, len(sm.FEATURE_NAMES))
    np.testing.assert_array_equal(f1[:, :NUM_CLASSES].sum(1), 1.0)  # exactly one class read
    np.testing.assert_array_equal(f1[:, :NUM_CLASSES].argmax(1), labels)
    np.testing.assert_array_equal(f1[:, :NUM_CLASSES].argmax(1), classify_shapes(r1))
    # clean drawings: the matte explains the image, the colours and geometry are in the generator's ranges
    assert f1[:, 17].max() * sm.RESIDUAL_SCALE < 0.01
    assert (f1[:, 12:14] * sm.SIZE_SCALE).min() > 0.3 and (f1[:, 12:14] * sm.SIZE_SCALE).max() < 0.75
    assert f1[:, 6:12].min() >= 0 and f1[:, 6:12].max() <= 1


def test_features_do_not_depend_on_the_value_range(real):
    _, r2, _, f2 = real
    np.testing.assert_array_equal(sm.image_features(r2.astype(np.float32) / 255), f2)
    np.testing.assert_array_equal(sm.image_features(r2.astype(np.float64) / 255), f2)
    with pytest.raises(ValueError, match="uint8"):
        sm.image_features(r2.astype(np.int32))


def test_identical_sets_give_zero(real):
    r1, _, _, _ = real
    res = sm.distribution_metrics(r1, r1.astype(np.float32) / 255)
    assert abs(res["shape_fd"]) < 1e-9
    assert res["shape_precision"] == 1.0 and res["shape_recall"] == 1.0


def test_a_second_real_set_is_close(real):
    _, _, f1, f2 = real
    assert sm.shape_fd(f2, f1) < 0.25
    p, r = sm.shape_precision_recall(f2, f1)
    assert p > 0.8 and r > 0.8
    # hand-drawn shapes in the dataset's ranges look real too
    assert sm.shape_fd(sm.image_features(_drawn(N_GEN, 1)), f1) < 0.35


def test_one_repeated_image_has_low_recall(real):
    _, r2, f1, f2 = real
    res = sm.distribution_metrics(np.repeat(r2[:1], N_GEN, axis=0), real[0])
    assert res["shape_recall"] < 0.05  # its manifold is one point
    assert res["shape_fd"] > 10 * sm.shape_fd(f2, f1)


def test_one_hue_is_far(real):
    _, _, f1, f2 = real
    fd_real = sm.shape_fd(f2, f1)
    fd_varied = sm.shape_fd(sm.image_features(_drawn(N_GEN, 2)), f1)
    green = sm.image_features(_drawn(N_GEN, 2, hue=1 / 3))
    fd_green = sm.shape_fd(green, f1)
    assert fd_green > 4 * fd_real and fd_green > 3 * fd_varied
    assert sm.shape_precision_recall(green, f1)[1] < 0.8


def test_one_class_is_far(real):
    _, _, f1, f2 = real
    circles = np.stack([draw_example(i, "test", SIZE)[0] for i in range(N_REF + N_GEN, N_REF + 7 * N_GEN, 6)])
    fc = sm.image_features(circles)
    assert fc[:, 0].min() == 1.0
    assert sm.shape_fd(fc, f1) > 5 * sm.shape_fd(f2, f1)
    assert sm.shape_precision_recall(fc, f1)[1] < 0.5


def test_shape_metrics_floors(real):
    r1, r2, f1, f2 = real
    seen = []

    def identity(x01):
        seen.append(x01)
        return x01

    res = sm.shape_metrics(r2.astype(np.float32) / 255, identity, n_ref=N_REF)
    # the generated set is R2 itself: its distance is the real-vs-real floor, and an exact tokenizer's too
    assert res["shape_fd"] == pytest.approx(res["shape_fd_real"]) == pytest.approx(res["shape_fd_floor"])
    assert res["shape_fd_real"] == pytest.approx(sm.shape_fd(f2, f1))
    assert seen[0].dtype == np.float32 and seen[0].max() <= 1.0
    assert (res["shape_n_ref"], res["shape_n_second"]) == (N_REF, N_GEN)
    assert "shape_fd_floor" not in sm.shape_metrics(r2, n_ref=N_REF)


def test_small_and_large_generated_sets(real, monkeypatch):
    r1, r2, _, _ = real
    res = sm.shape_metrics(r2[:3], n_ref=N_REF)  # too few for k-NN manifolds (k = 3)
    assert res["shape_precision"] is None and res["shape_recall"] is None and res["shape_fd"] > 0
    monkeypatch.setattr(sm, "NUM_TEST", N_REF + 14)  # room for 14 more test images: 2 of each class
    big = r1[:24]  # 4 of each class: only a class-balanced head fits beside the reference
    with pytest.raises(ValueError, match="labels"):
        sm.shape_metrics(big, n_ref=N_REF)
    res = sm.shape_metrics(big, n_ref=N_REF, labels=np.arange(24) % NUM_CLASSES)
    assert res["shape_n_second"] == 12
    assert res["shape_fd"] == pytest.approx(sm.shape_metrics(r1[:12], n_ref=N_REF)["shape_fd"])


KEYS = ("shape_fd", "shape_precision", "shape_recall", "shape_fd_floor", "shape_fd_real")


def _fake_samples(n_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Real test images beyond R1 and R2 as 'samples', row-major by class."""
    ids = [N_REF + N_GEN + 6 * j + c for c in range(NUM_CLASSES) for j in range(n_per_class)]
    imgs = np.stack([draw_example(i, "test", SIZE)[0] for i in ids]).astype(np.float32) / 255
    return imgs, np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), n_per_class)


def _bundle():
    """A VAR model directory as loaded, with nothing in it (the sampler is replaced in these tests)."""
    from types import SimpleNamespace

    from varjax.core.model_dir import ModelBundle

    return ModelBundle("var", SimpleNamespace(image_size=SIZE), {}, SimpleNamespace(num_classes=NUM_CLASSES), {})


def test_var_eval_reports_the_distribution_metric(monkeypatch):
    """The wiring of ``varjax eval`` (sampler and tokenizer replaced by real images and a known map)."""
    from varjax.eval import consistency

    imgs, labels = _fake_samples(8)
    bundle = _bundle()
    monkeypatch.setattr(consistency, "load_model_dir", lambda ckpt, ema=True: bundle)
    monkeypatch.setattr(consistency, "tokenizer_numbers", lambda b, n: {})
    monkeypatch.setattr(consistency, "decoder_gflops_per_image", lambda cfg, params: 0.0)
    monkeypatch.setattr(consistency, "sample_per_class",
                        lambda b, per, opts, seed, classes: (imgs, labels, {"gflops_per_image": 1.0}))
    monkeypatch.setattr(consistency, "reconstruct", lambda cfg, p, x: x[:, ::-1])  # a "tokenizer" that flips images
    res = consistency.evaluate("tiny", per_class_n=8, shape_ref=N_REF)
    assert all(isinstance(res[k], float) for k in KEYS) and res["shape_n_second"] == len(imgs)
    want = sm.shape_metrics(imgs, lambda x: x[:, ::-1], n_ref=N_REF)
    assert all(res[k] == pytest.approx(want[k]) for k in KEYS)
    assert res["shape_fd_floor"] > res["shape_fd_real"]  # flipped triangles point down: read as other classes
    assert res["class_consistency"] == 1.0 and res["family"] == "var" and res["gflops_per_image"] == 1.0
    assert res["sampling"]["cfg"] == 1.5  # the VAR sampler's defaults
    assert "shape_fd" not in consistency.evaluate("tiny", per_class_n=8, shape_ref=0)


def test_the_grid_shows_the_first_samples_of_each_class(monkeypatch, tmp_path):
    """Scoring many samples per class keeps the grid at ``GRID_PER_CLASS`` columns, each row one class."""
    from varjax.eval import consistency

    imgs, labels = _fake_samples(3)
    rows = consistency.grid_rows(imgs, 3, shown=2)
    np.testing.assert_array_equal(rows, imgs[[0, 1, 3, 4, 6, 7, 9, 10, 12, 13, 15, 16]])
    assert consistency.grid_rows(imgs, 3, shown=16).shape == imgs.shape
    saved = []
    monkeypatch.setattr("varjax.data.images.save_grid", lambda path, x, nrow: saved.append((x.shape, nrow)))
    monkeypatch.setattr(consistency, "GRID_PER_CLASS", 2)
    monkeypatch.setattr(consistency, "load_model_dir", lambda ckpt, ema=True: _bundle())
    monkeypatch.setattr(consistency, "tokenizer_numbers", lambda b, n: {})
    monkeypatch.setattr(consistency, "decoder_gflops_per_image", lambda cfg, params: 0.0)
    monkeypatch.setattr(consistency, "sample_per_class", lambda b, per, opts, seed, classes: (imgs, labels, {}))
    res = consistency.evaluate("tiny", per_class_n=3, shape_ref=0, grid=str(tmp_path / "g.png"))
    assert res["num_samples"] == 18 and saved == [((12, SIZE, SIZE, 3), 2)]


def test_ecar_eval_reports_the_distribution_metric(monkeypatch):
    """The same evaluation for E-CAR: reconstructions through the KL autoencoder (tiny, random), the sampling
    defaults of the model directory."""
    from types import SimpleNamespace

    import jax
    import jax.numpy as jnp
    from flax.core import meta

    from varjax.core.model_dir import ModelBundle
    from varjax.eval import consistency
    from varjax.models.kl_ae import KLAE, KLAEConfig
    from varjax.sampling import codec

    ae_cfg = KLAEConfig(z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, using_sa=False, using_mid_sa=False,
                        num_groups=8, image_size=SIZE)
    # random weights of the right shapes (compiling the initialiser costs far more than the test)
    shapes = jax.eval_shape(lambda k: KLAE(ae_cfg).init(k, jnp.zeros((1, SIZE, SIZE, 3)), method=KLAE.init_all),
                            jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(0)
    ae_params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype), meta.unbox(shapes))
    manifest = {"ecar": {"sample": {"cfg": 4.0, "steps": 2, "solver": "heun", "temperature": 0.3}}}
    bundle = ModelBundle("ecar", ae_cfg, ae_params, SimpleNamespace(num_classes=NUM_CLASSES), {}, manifest)
    imgs, labels = _fake_samples(4)
    seen = {}

    def fake_samples(b, per, opts, seed, classes):
        seen["opts"] = opts
        return imgs, labels, {}

    monkeypatch.setattr(consistency, "load_model_dir", lambda path, ema=True: bundle)
    monkeypatch.setattr(consistency, "tokenizer_numbers", lambda b, n: {})
    monkeypatch.setattr(consistency, "decoder_gflops_per_image", lambda cfg, params: 0.0)
    monkeypatch.setattr(consistency, "sample_per_class", fake_samples)
    res = consistency.evaluate("tiny", per_class_n=4, shape_ref=N_REF, flags={"flow_steps": 3})
    assert all(isinstance(res[k], float) for k in KEYS) and res["shape_n_second"] == len(imgs)
    assert res["shape_fd"] == pytest.approx(sm.shape_metrics(imgs, n_ref=N_REF)["shape_fd"])
    # the model directory's defaults, a flag over them
    assert res["sampling"] == {"cfg": 4.0, "stage_cfg": [], "steps": 3, "stage_steps": [], "solver": "heun",
                               "temperature": 0.3, "seed": 0, "ema": True}
    assert seen["opts"].steps == 3
    rec = codec.reconstruct(ae_cfg, ae_params, imgs[:3])
    z = jax.jit(lambda p, x: KLAE(ae_cfg).apply({"params": p}, x, method=KLAE.encode))(ae_params, imgs[:3] * 2 - 1)
    want = jax.jit(lambda p, z: KLAE(ae_cfg).apply({"params": p}, z, method=KLAE.decode))(ae_params, z)
    np.testing.assert_allclose(rec, np.clip((np.asarray(want) + 1) / 2, 0, 1), atol=1e-5)
    # a random autoencoder reconstructs nothing: its floor is far above the real one
    assert res["shape_fd_floor"] > 5 * res["shape_fd_real"]
