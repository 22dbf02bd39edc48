"""Per-program XLA options: faster convolution kernels on the CPU backend.

XLA:CPU's own convolution kernel is slower than the oneDNN kernel that PyTorch uses on x86: one 3x3,
160->160 convolution on 2x256x256 takes 0.90 CPU s against torch's 0.74. Setting the YNNPACK fusion types
of jaxlib 0.10 to ``dot`` (``xla_cpu_experimental_ynn_fusion_type``) brings it to 0.67 CPU s. The released
VQVAE's decode then takes 4.5 s instead of 6.1 s for two images, and a tokenizer training step 0.053 s
instead of 0.069 s (bench/README.md).

The same option makes the transformer's matmul-bound training steps slower (the main job's VAR step
0.161 -> 0.220 s, d8 4.67 -> 4.83 s). So it is not a process-wide XLA_FLAGS setting: it is given to the
programs whose time is convolutions (the tokenizers' training steps, VQVAE encode/decode and the sampler,
whose time is the decode), through ``jax.jit(..., compiler_options=...)``.

Only for the CPU backend and a jaxlib that knows the option (an unknown option fails the compile);
``VARJAX_CPU_CONV_KERNELS=xla`` turns it off.
"""

from __future__ import annotations

import os
from importlib import metadata

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
YNN_DOT = "LIBRARY_FUSION_TYPE_DOT"
YNN_MIN_JAXLIB = (0, 10)  # the first jaxlib where the option is known (and measured)


def jaxlib_version() -> tuple[int, ...]:
    try:
        parts = metadata.version("jaxlib").split(".")[:2]
    except metadata.PackageNotFoundError:
        return (0,)
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def conv_options_for(backend: str, version: tuple[int, ...], choice: str = "ynn") -> dict[str, str]:
    """The compiler options of a convolution-bound program on ``backend`` with jaxlib ``version``."""
    if backend != "cpu" or version < YNN_MIN_JAXLIB or choice == "xla":
        return {}
    return {YNN_OPTION: YNN_DOT}


def conv_compiler_options() -> dict[str, str]:
    """``compiler_options`` for ``jax.jit`` of a program whose time is convolutions, on this process's backend."""
    import jax

    choice = os.environ.get("VARJAX_CPU_CONV_KERNELS", "ynn")
    return conv_options_for(jax.default_backend(), jaxlib_version(), choice)
