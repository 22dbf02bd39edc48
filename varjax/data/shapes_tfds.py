"""The `varjax_shapes` TFDS builder: the procedurally drawn shapes of ``varjax.data.shapes`` as a dataset.

Build it like any TFDS dataset (nothing is downloaded)::

    import tensorflow_datasets as tfds
    import varjax.data.shapes_tfds  # registers the builder
    builder = tfds.builder('varjax_shapes/32', data_dir=DATA_DIR)
    builder.download_and_prepare()

Smaller variants are made with a custom config:
`tfds.builder('varjax_shapes', config=VarjaxShapesConfig(name='mini', image_size=16, num_train=64,
num_test=32))`. Such a config, once prepared, can also be loaded by name (`'varjax_shapes/mini'`) from the
same `data_dir`.
"""

from __future__ import annotations

import dataclasses

from varjax.data import shapes
from varjax.data.shapes import CLASS_NAMES, draw_example
from varjax.data.tf_import import tfds


@dataclasses.dataclass
class VarjaxShapesConfig(tfds.core.BuilderConfig):
    """Resolution and size of a `varjax_shapes` variant.

    Attributes:
      image_size: side of the square images, in pixels.
      num_train: examples in the 'train' split.
      num_test: examples in the 'test' split.
    """

    image_size: int = 32
    num_train: int = 12000
    num_test: int = 1200


class VarjaxShapes(tfds.core.GeneratorBasedBuilder):
    """Procedurally drawn coloured shapes, one of `NUM_CLASSES` kinds per image (see module docstring)."""

    name = "varjax_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        VarjaxShapesConfig(name="32", image_size=32, description="32x32 images, 12000 train / 1200 test."),
        VarjaxShapesConfig(name="64", image_size=64, description="64x64 images, 12000 train / 1200 test."),
        VarjaxShapesConfig(
            name="tiny", image_size=32, num_train=96, num_test=48,
            description="32x32 images, 96 train / 48 test, for smoke tests.",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=shapes.__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3)),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=("image", "label"),
            # Keep index order on disk: shards of `tfds.even_splits` are then contiguous index ranges, each
            # with balanced classes; readers shuffle anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, num_examples: int):
        size = self.builder_config.image_size
        for index in range(num_examples):
            image, label = draw_example(index, split, size)
            yield index, {"image": image, "label": label}
