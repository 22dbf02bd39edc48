"""Datasets and input pipeline.

`varjax.data.shapes`: the embedded `varjax_shapes` TFDS dataset and its shape detector.
`varjax.data.pipeline`: per-process, deterministic, resumable tf.data batches for the trainers.
"""
