"""varjax: VAR (next-scale prediction) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="varjax",
    version="0.1.0",
    description="Visual AutoRegressive modeling (next-scale prediction) in JAX/Flax",
    # configs/ ships as the package varjax.configs, so `--config var_d16` works without a source checkout.
    packages=find_packages(include=["varjax", "varjax.*"]) + ["varjax.configs"],
    package_dir={"varjax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.11",
        "etils[epath]>=1.7",
        "ml_collections>=0.1.1",
        "chex>=0.1.87",
        "numpy>=1.26",
        "ml_dtypes",
        "safetensors>=0.4",
        "pillow>=10",
        "scipy>=1.10",
        "matplotlib>=3.8",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        "tensorboardX>=2.6",
        "absl-py",
        "importlib_resources",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.6", "ruff>=0.6"], "tpu": ["libtpu"]},
    entry_points={"console_scripts": ["varjax=varjax.cli:main"]},
)
