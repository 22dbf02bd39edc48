"""Data: the embedded dataset, image files, training sources and their resumable iterators.

``shapes``: the `varjax_shapes` drawings and their analytic detector (no TensorFlow); ``shapes_tfds``: the same
as a TFDS dataset. ``sources``: which data a run reads (images, token cache, latent cache) and its iterator;
``pipeline``: the TensorFlow image pipeline; ``caches``: token and latent caches; ``iterator``: resumable,
sharded iteration. ``images``: image files and PNG grids at the command line's edges.
"""
