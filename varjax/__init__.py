"""varjax: VAR (Visual AutoRegressive modeling by next-scale prediction) in JAX/Flax."""

__version__ = "0.1.0"
