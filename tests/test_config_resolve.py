"""``varjax.config.resolve``: the data source is chosen before the step count, so epochs of a run on a token or
latent cache count the cache (not the image dataset, which is never opened); the Plan holds every derived value."""

import dataclasses
import sys

import jax
import pytest

from tests import _tiny
from varjax import config, train

CACHED = 64  # examples in the session's token and latent caches (the tiny image dataset has 96)


@pytest.fixture
def no_image_pipeline(monkeypatch):
    """The TensorFlow image pipeline cannot be imported: planning and training must not need it."""
    import varjax.data

    monkeypatch.delattr(varjax.data, "pipeline", raising=False)
    monkeypatch.setitem(sys.modules, "varjax.data.pipeline", None)


def test_token_cache_epochs_count_the_cache(vq_dir, tokens_cache, no_image_pipeline):
    cfg = _tiny.var_config(vq_dir, tokens_cache, total_steps=None, total_epochs=3.0, opt__warmup_fraction=None,
                           opt__warmup_epochs=0.5)
    plan = config.resolve(cfg)
    assert (plan.data.source, plan.data.cache) == ("tokens", tokens_cache)
    assert plan.steps_per_epoch == CACHED // cfg.batch_size == 8  # the images would give 96 // 8 = 12
    assert plan.total_steps == 3 * 8 and plan.warmup_steps == 4
    assert plan.data.num_classes == 6  # a known dataset name: nothing opened


def test_latent_cache_epochs_count_the_cache(kl_dir, latents_cache, no_image_pipeline):
    cfg = _tiny.ecar_config(kl_dir, latents_cache, total_steps=None, total_epochs=0.5, batch_size=16)
    plan = config.resolve(cfg)
    assert (plan.data.source, plan.steps_per_epoch, plan.total_steps) == ("latents", CACHED // 16, 2)


def test_a_run_on_a_cache_trains_the_planned_epochs(vq_dir, tokens_cache, no_image_pipeline, tmp_path):
    """The loop's iterator agrees with the plan (the loop stops otherwise) and the run lasts the cache's epochs."""
    cfg = _tiny.var_config(vq_dir, tokens_cache, total_steps=None, total_epochs=0.25, log_every=1, ckpt_every=100)
    plan = config.resolve(cfg)
    assert plan.total_steps == 2
    last = train.train(plan, str(tmp_path / "run"))
    assert list(_tiny.read_losses(tmp_path / "run")) == [1, 2] and last["prog_si"] == -1.0


def test_the_plan_holds_the_derived_values(vq_dir, tokens_cache):
    cfg = _tiny.var_config(vq_dir, tokens_cache, model__embed_dim=None, model__num_heads=None,
                           model__drop_path_rate=None, mesh=(("data", -1), ("fsdp", 2), ("tensor", 1)), tblr=1e-4)
    plan = config.resolve(cfg)
    depth = cfg.model.depth
    assert (plan.model.embed_dim, plan.model.num_heads) == (64 * depth, depth)  # the release's width rule
    assert plan.model.drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert (plan.model.vocab_size, plan.model.Cvae, plan.model.patch_nums) == (64, 8, (1, 2, 4, 8))
    assert plan.model.num_classes == 6 and plan.tokenizer == _tiny.vq_cfg()
    assert plan.mesh == (("data", jax.device_count() // 2), ("fsdp", 2), ("tensor", 1))
    assert plan.peak_lr == pytest.approx(1e-4 * cfg.batch_size / 256) and plan.process_count == 1
    assert plan.config.tblr == 1e-4
    with pytest.raises(AttributeError):  # read-only
        plan.config.tblr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.total_steps = 1


@pytest.mark.parametrize("field, value, match", [
    ("batch_size", 6, r"config\.batch_size`=6 cannot be split"),
    ("ema_decay", 1.0, r"config\.ema_decay=1\.0 must lie in \[0\.0, 1\.0\)"),
    ("profile_steps", (3, 1), r"profile_steps=\(3, 1\)"),
    ("total_steps", 0, "0 training steps"),
    ("stop_at_step", 5, r"config\.stop_at_step=5 must lie in \[1, 4\]"),
    ("task", "gan", r"config\.task='gan'"),
])
def test_bad_values_are_named(vq_dir, tokens_cache, field, value, match):
    cfg = _tiny.var_config(vq_dir, tokens_cache)
    _tiny.set_fields(cfg, **{field: value})
    with pytest.raises(ValueError, match=match):
        config.resolve(cfg)


def test_a_generator_needs_a_tokenizer_of_its_family(kl_dir, vq_dir, tokens_cache):
    with pytest.raises(ValueError, match="config.tokenizer_dir is empty"):
        config.resolve(_tiny.var_config("", tokens_cache))
    with pytest.raises(ValueError, match="holds a 'kl' tokenizer; task 'var' needs a 'vq' one"):
        config.resolve(_tiny.var_config(kl_dir, tokens_cache))
    with pytest.raises(ValueError, match="task 'ecar' reads images or latents"):
        config.resolve(_tiny.ecar_config(kl_dir, data__tokens_cache=tokens_cache))
    with pytest.raises(ValueError, match="holds a 'vq' tokenizer; task 'ecar' needs a 'kl' one"):
        config.resolve(_tiny.ecar_config(vq_dir))
