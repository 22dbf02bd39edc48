"""Tests of the embedded dataset, its detector and the input pipeline (CPU, tiny sizes)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from scipy import ndimage
from varjax.configs import common

from varjax.data import caches, pipeline, shapes, shapes_tfds

SIZE = 16  # stored image side of the unit-test dataset
NUM_TRAIN, NUM_TEST = 64, 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data dir holding `varjax_shapes/unit`: 16x16 images, 64 train / 32 test."""
    root = str(tmp_path_factory.mktemp("tfds"))
    config = shapes_tfds.VarjaxShapesConfig(name="unit", image_size=SIZE, num_train=NUM_TRAIN, num_test=NUM_TEST)
    tfds.builder("varjax_shapes", data_dir=root, config=config).download_and_prepare()
    return root


def shapes_cfg(data_dir, **overrides):
    cfg = common.data()
    cfg.name, cfg.data_dir = "varjax_shapes/unit", data_dir
    cfg.update(overrides)
    return cfg


def digest(image) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Dataset.


def test_builder_writes_the_drawn_examples(data_dir):
    builder = tfds.builder("varjax_shapes/unit", data_dir=data_dir)
    assert builder.info.supervised_keys == ("image", "label")
    assert builder.info.features["label"].names == list(shapes.CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == NUM_TRAIN
    assert builder.info.splits["test"].num_examples == NUM_TEST
    examples = list(tfds.as_numpy(builder.as_dataset(split="test")))
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    assert images.shape == (NUM_TEST, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert images.min() < 64 and images.max() > 192  # dark and light pixels both occur
    assert set(labels) == set(range(shapes.NUM_CLASSES))
    for index in (0, 5, NUM_TEST - 1):  # stored in index order
        image, label = shapes.draw_example(index, "test", SIZE)
        np.testing.assert_array_equal(images[index], image)
        assert labels[index] == label


def test_predefined_configs():
    configs = {c.name: c for c in shapes_tfds.VarjaxShapes.BUILDER_CONFIGS}
    assert configs["32"].image_size == 32 and configs["64"].image_size == 64
    assert (configs["32"].num_train, configs["32"].num_test) == (12000, 1200)


def test_draw_example_is_deterministic():
    image, label = shapes.draw_example(3, "train", 32)
    again, label_again = shapes.draw_example(3, "train", 32)
    np.testing.assert_array_equal(image, again)
    assert label == label_again == 3
    assert digest(image) != digest(shapes.draw_example(3, "test", 32)[0])
    assert digest(image) != digest(shapes.draw_example(9, "train", 32)[0])  # same label, new scene
    # Bytes fixed once and for all: the dataset must be identical on every machine.
    golden = {(0, "train", 32): "58488ae4bd03c6fa", (7, "test", 32): "d3359bab3f09222d",
              (11, "train", 64): "c9058d4cf755000a"}
    for (index, split, size), want in golden.items():
        assert digest(shapes.draw_example(index, split, size)[0])[:16] == want


def test_draw_example_geometry():
    """The shape stays off the border, and a 64-pixel drawing is the same scene as the 32-pixel one."""
    for index in range(24):
        small = shapes.draw_example(index, "train", 32)[0].astype(np.float64)
        large = shapes.draw_example(index, "train", 64)[0].astype(np.float64)
        pooled = large.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        assert np.abs(pooled - small).mean() < 4.0
        corners = small[[0, 0, -1, -1], [0, -1, 0, -1]]
        border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
        # Border pixels are background: within the gradient spanned by the four corners.
        assert np.all(border >= corners.min(axis=0) - 2) and np.all(border <= corners.max(axis=0) + 2)


# ----------------------------------------------------------------------------------------------------------
# Detector.


@pytest.fixture(scope="module")
def real_images():
    examples = [shapes.draw_example(i, "test", 32) for i in range(240)]
    return np.stack([e[0] for e in examples]), np.array([e[1] for e in examples])


def test_detector_on_real_images(real_images):
    images, labels = real_images
    predicted = shapes.classify_shapes(images)
    assert predicted.dtype == np.int32 and predicted.shape == labels.shape
    assert np.mean(predicted == labels) >= 0.97
    # Any affine intensity scale gives the same answer, e.g. the model's [-1, 1].
    np.testing.assert_array_equal(shapes.classify_shapes(images / 127.5 - 1.0), predicted)


def test_detector_tolerates_noise_and_blur(real_images):
    images, labels = real_images
    rng = np.random.default_rng(0)
    noisy = images + rng.normal(0.0, 10.0, images.shape)
    assert np.mean(shapes.classify_shapes(noisy) == labels) >= 0.97
    blurred = ndimage.gaussian_filter(images.astype(np.float64), (0, 0.7, 0.7, 0))
    assert np.mean(shapes.classify_shapes(blurred) == labels) >= 0.97


def test_detector_without_a_shape():
    flat = np.full((2, 32, 32, 3), 90, dtype=np.uint8)
    np.testing.assert_array_equal(shapes.classify_shapes(flat), [-1, -1])
    with pytest.raises(ValueError, match="B, H, W, 3"):
        shapes.classify_shapes(np.zeros((32, 32, 3)))


# ----------------------------------------------------------------------------------------------------------
# Pipeline over TFDS.


def test_train_batches(data_dir):
    cfg = shapes_cfg(data_dir, hflip=True)
    it = pipeline.build_train_iter(cfg, image_size=8, global_batch_size=16, process_index=0,
                                   process_count=2, seed=0)
    assert it.steps_per_epoch == (NUM_TRAIN // 2) // 8
    batch = next(it)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert -1.0 <= batch["image"].min() < -0.5 and 0.5 < batch["image"].max() <= 1.0
    assert pipeline.count_examples(cfg, "train") == NUM_TRAIN
    assert pipeline.num_classes(cfg) == shapes.NUM_CLASSES


def exact_cfg(data_dir):
    """No resize, no flip: crops of the stored size are the stored images, so examples can be compared."""
    return shapes_cfg(data_dir, mid_reso=1.0, hflip=False)


def to_uint8(image_pm1):
    """[-1, 1] -> uint8, exact for images that were not resampled."""
    return np.round((image_pm1 + 1.0) * 127.5).astype(np.uint8)


def image_set(batches):
    return {digest(to_uint8(image)) for batch in batches for image in batch["image"]}


def test_process_shards_are_disjoint_and_cover_the_split(data_dir):
    cfg = exact_cfg(data_dir)
    it = pipeline.build_train_iter(cfg, image_size=SIZE, global_batch_size=8, process_index=0,
                                   process_count=1, seed=0)
    whole = image_set(next(it) for _ in range(NUM_TRAIN // 8))
    stored = {digest(shapes.draw_example(i, "train", SIZE)[0]) for i in range(NUM_TRAIN)}
    assert len(whole) == NUM_TRAIN and whole == stored

    parts = []
    for process in range(2):
        it = pipeline.build_train_iter(cfg, image_size=SIZE, global_batch_size=8, process_index=process,
                                       process_count=2, seed=0)
        parts.append(image_set(next(it) for _ in range(it.steps_per_epoch)))
    assert parts[0].isdisjoint(parts[1])
    assert parts[0] | parts[1] == stored


def test_global_batches_do_not_depend_on_the_process_count(data_dir):
    cfg = exact_cfg(data_dir)
    cfg.num_shards = 2
    one = pipeline.build_train_iter(cfg, image_size=SIZE, global_batch_size=8, process_index=0, process_count=1,
                                    seed=3)
    two = [pipeline.build_train_iter(cfg, image_size=SIZE, global_batch_size=8, process_index=p, process_count=2,
                                     seed=3) for p in range(2)]
    for _ in range(one.steps_per_epoch + 2):  # across an epoch boundary
        whole, halves = next(one), [next(t) for t in two]
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    state = one.state()
    assert state == two[0].state()
    resumed = pipeline.build_train_iter(cfg, image_size=SIZE, global_batch_size=8, process_index=0,
                                        process_count=1, seed=3)
    resumed.restore(state)
    assert_same_batches([next(resumed)], [next(one)])
    cfg.num_shards = 3
    with pytest.raises(ValueError, match="num_shards"):
        pipeline.build_train_iter(cfg, image_size=SIZE, global_batch_size=6, process_index=0, process_count=2, seed=0)


def test_epochs_are_reshuffled_and_seeded(data_dir):
    cfg = exact_cfg(data_dir)

    def first_epoch_labels(seed):
        it = pipeline.build_train_iter(cfg, image_size=SIZE, global_batch_size=8, process_index=0,
                                       process_count=1, seed=seed)
        return [np.concatenate([next(it)["label"] for _ in range(it.steps_per_epoch)]) for _ in range(2)]

    epoch0, epoch1 = first_epoch_labels(0)
    assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(first_epoch_labels(0)[0], epoch0)
    assert not np.array_equal(first_epoch_labels(1)[0], epoch0)


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_resume_replays_the_same_batches(data_dir):
    cfg = shapes_cfg(data_dir, hflip=True)  # random crops and flips must be replayed too
    kwargs = dict(image_size=12, global_batch_size=20, process_index=1, process_count=2, seed=7)
    reference = pipeline.build_train_iter(cfg, **kwargs)
    assert reference.steps_per_epoch == 3
    consumed = 4  # crosses an epoch boundary
    for _ in range(consumed):
        next(reference)
    state = reference.state()
    assert state["epoch"] == 1 and state["position"] == 1
    state = json.loads(json.dumps(state))
    expected = [next(reference) for _ in range(4)]

    resumed = pipeline.build_train_iter(cfg, **kwargs)
    next(resumed)  # restoring also works on an iterator that has already started
    resumed.restore(state)
    assert_same_batches([next(resumed) for _ in range(4)], expected)

    with pytest.raises(ValueError, match="global_batch_size"):
        pipeline.build_train_iter(cfg, **{**kwargs, "global_batch_size": 10}).restore(state)


def test_indivisible_global_batch_raises(data_dir):
    with pytest.raises(ValueError, match="global_batch_size=9 must be a positive multiple"):
        pipeline.build_train_iter(shapes_cfg(data_dir), image_size=8, global_batch_size=9,
                                  process_index=0, process_count=2, seed=0)
    with pytest.raises(ValueError, match="process_index=2"):
        pipeline.build_eval_iter(shapes_cfg(data_dir), image_size=8, global_batch_size=4,
                                 process_index=2, process_count=2)


def test_eval_pads_the_last_batch(data_dir):
    cfg = exact_cfg(data_dir)
    shards = []
    for process in range(3):  # 32 examples -> shards of 11, 11, 10
        batches = pipeline.build_eval_iter(cfg, image_size=SIZE, global_batch_size=12,
                                           process_index=process, process_count=3)
        batches = list(batches)
        assert len(batches) == 3  # ceil(11 / 4) on every process
        mask = np.concatenate([b["mask"] for b in batches])
        assert mask.dtype == np.float32 and mask.sum() == (11, 11, 10)[process]
        assert np.all(mask[: int(mask.sum())] == 1)  # real examples first, padding last
        shards.append({digest(to_uint8(img)) for b in batches for img, m in zip(b["image"], b["mask"], strict=True)
                       if m})
    stored = {digest(shapes.draw_example(i, "test", SIZE)[0]) for i in range(NUM_TEST)}
    assert set.union(*shards) == stored and sum(map(len, shards)) == NUM_TEST


def test_resize_short_side_matches_torchvision_sizes():
    image = np.zeros((20, 30, 3), np.uint8)
    assert tuple(pipeline.resize_short_side(image, 18).shape) == (18, 27, 3)
    assert tuple(pipeline.resize_short_side(image.transpose(1, 0, 2), 7).shape) == (10, 7, 3)
    # Lanczos overshoot is clipped to the uint8 range.
    stripes = np.zeros((16, 16, 3), np.uint8)
    stripes[:, ::2] = 255
    out = pipeline.resize_short_side(stripes, 23).numpy()
    assert out.min() >= 0 and out.max() <= 255 and np.all(out == np.round(out))


# ----------------------------------------------------------------------------------------------------------
# Folders and token caches.


def write_folder(root, split, per_class):
    """root/split/<class>/<i>.png with images of varying sizes; class c has pixel value 40 * (c + 1)."""
    for c, name in enumerate(("bee", "ant", "cat")):  # sorted: ant=0, bee=1, cat=2
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for i in range(per_class):
            pixels = np.full((10 + i, 14, 3), 40 * (c + 1), np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))


def test_folder_dataset(tmp_path):
    root = str(tmp_path / "imagenet")
    write_folder(root, "train", per_class=4)
    write_folder(root, "val", per_class=2)
    cfg = common.data()
    cfg.name, cfg.folder, cfg.eval_split = "folder", root, "validation"  # 'validation' falls back to val/
    assert pipeline.num_classes(cfg) == 3
    assert pipeline.count_examples(cfg, "train") == 12 and pipeline.count_examples(cfg, "validation") == 6

    it = pipeline.build_train_iter(cfg, image_size=8, global_batch_size=4, process_index=0,
                                   process_count=2, seed=0)
    batch = next(it)
    assert batch["image"].shape == (2, 8, 8, 3)
    # Every image is flat, so its value identifies its class: bee (value 40) has id 1, ant (80) 0, cat 2.
    value_of_label = {0: 80, 1: 40, 2: 120}
    for image, label in zip(batch["image"], batch["label"], strict=True):
        np.testing.assert_allclose(image, value_of_label[int(label)] / 127.5 - 1.0, atol=1e-5)

    batches = list(pipeline.build_eval_iter(cfg, image_size=8, global_batch_size=4, process_index=0,
                                            process_count=1))
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels[:6], [0, 0, 1, 1, 2, 2])  # sorted by class, then file


def test_folder_errors(tmp_path):
    cfg = common.data()
    cfg.name, cfg.folder = "folder", str(tmp_path / "missing")
    with pytest.raises(ValueError, match="missing/train"):
        pipeline.num_classes(cfg)
    os.makedirs(tmp_path / "empty" / "train" / "dog")
    cfg.folder = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no images"):
        pipeline.count_examples(cfg, "train")


def test_unknown_dataset_name_raises(tmp_path):
    cfg = common.data()
    cfg.name, cfg.data_dir = "no_such_dataset_xyz", str(tmp_path)
    with pytest.raises(ValueError, match="no_such_dataset_xyz"):
        pipeline.num_classes(cfg)


def test_num_classes_reads_the_features_without_preparing_the_data(tmp_path):
    # e.g. `varjax compile` for ImageNet on a host that has no ImageNet: nothing is downloaded or written
    cfg = common.data()
    cfg.name, cfg.data_dir = "imagenet2012", str(tmp_path / "tfds")
    assert pipeline.num_classes(cfg) == 1000
    assert not (tmp_path / "tfds").exists()


def test_token_cache(tmp_path):
    num, length = 40, 5
    tokens = np.arange(num * length, dtype=np.int32).reshape(num, length) % 4096
    labels = np.arange(num) % 7
    path = str(tmp_path / "tokens")
    caches.write_token_cache(path, tokens, labels)
    stored, _ = caches.read_token_cache(path)
    assert stored.dtype == np.int16  # ids below 2**15 are stored compactly
    assert caches.cache_size(path, "tokens") == num and caches.exists(path, "tokens")

    kwargs = dict(global_batch_size=8, process_count=2, seed=3)
    rows = []
    for process in range(2):
        it = caches.train_iterator(path, "tokens", process_index=process, **kwargs)
        assert it.steps_per_epoch == caches.steps_per_epoch(path, "tokens", 8, 2) == 5
        batch = next(it)
        assert batch["tokens"].shape == (4, length) and batch["tokens"].dtype == np.int32
        assert batch["label"].dtype == np.int32
        np.testing.assert_array_equal(labels[batch["tokens"][:, 0] // length], batch["label"])
        epoch = [batch] + [next(it) for _ in range(it.steps_per_epoch - 1)]
        rows.append({int(r) for b in epoch for r in b["tokens"][:, 0] // length})
    assert rows[0].isdisjoint(rows[1]) and rows[0] | rows[1] == set(range(num))

    reference = caches.train_iterator(path, "tokens", process_index=1, **kwargs)
    for _ in range(7):
        next(reference)
    state = reference.state()
    expected = [next(reference) for _ in range(3)]
    resumed = caches.train_iterator(path, "tokens", process_index=1, **kwargs)
    resumed.restore(state)
    assert_same_batches([next(resumed) for _ in range(3)], expected)

    with pytest.raises(ValueError, match="tokens_cache"):
        caches.train_iterator(str(tmp_path / "nowhere"), "tokens", process_index=0, **kwargs)


def test_latent_cache_and_the_planned_source(tmp_path):
    """A latent cache read as ``varjax.data.sources`` plans it: no TFDS, the cache's size and labels."""
    from varjax.data import sources

    rng = np.random.default_rng(0)
    latents, labels = rng.normal(size=(24, 2, 2, 3)), np.arange(24) % 6
    path = str(tmp_path / "latents")
    caches.write_cache(path, "latents", latents, labels)
    cfg = common.data()
    cfg.name = "no_such_dataset_xyz"  # never opened: a cache and a class count given
    dp = sources.plan(cfg, latents_cache=path, allowed=("images", "latents"), task="ecar", image_size=8,
                      global_batch_size=4, process_count=1, num_classes_override=6)
    assert (dp.source, dp.cache, dp.steps_per_epoch, dp.num_classes) == ("latents", path, 6, 6)
    it = sources.train_iterator(dp, global_batch_size=4, process_index=0, process_count=1, seed=0)
    seen = [next(it) for _ in range(6)]
    got = np.concatenate([b["latents"] for b in seen])
    assert got.dtype == np.float32 and got.shape == (24, 2, 2, 3)
    order = np.argsort(got[:, 0, 0, 0])
    np.testing.assert_allclose(got[order], latents[np.argsort(latents[:, 0, 0, 0])].astype(np.float32))
    with pytest.raises(ValueError, match="tokens_cache"):  # VAR's cache on a task that reads latents
        cfg.tokens_cache = path
        sources.choose_source(cfg, None, ("images", "latents"), "ecar")
    with pytest.raises(ValueError, match="both set"):
        sources.choose_source(cfg, path, ("images", "tokens", "latents"), "x")
    with pytest.raises(ValueError, match=r"\(24,\) integer array"):
        caches.write_cache(path, "latents", latents, labels[:5])


def test_partial_epochs_print_nothing(data_dir):
    """An epoch takes whole batches only and a run may stop inside one, so the source is left partly read; TF must
    not warn about a partly read cache when such an iterator is dropped (it did with TFDS's auto-cache)."""
    script = (
        "import sys, gc; from varjax.data import pipeline; from varjax.configs import common\n"
        "cfg = common.data(); cfg.name, cfg.data_dir = 'varjax_shapes/unit', sys.argv[1]\n"
        "cfg.shuffle_buffer = 8\n"  # smaller than the split: the source is left unread at the epoch's end
        "it = pipeline.build_train_iter(cfg, image_size=8, global_batch_size=24, process_index=0, process_count=1,"
        " seed=0)\n"
        "[next(it) for _ in range(2 * it.steps_per_epoch + 1)]\n"
        "del it; gc.collect()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", script, data_dir], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "did not fully read" not in done.stderr, done.stderr
