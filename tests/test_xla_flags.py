"""The CPU convolution kernels: given only to convolution-bound programs, only where the backend knows them."""

import jax
import jax.numpy as jnp
import numpy as np

from varjax.core.xla_flags import YNN_DOT, YNN_OPTION, conv_compiler_options, conv_options_for


def test_only_for_cpu_and_a_jaxlib_that_knows_the_option():
    assert conv_options_for("cpu", (0, 10)) == {YNN_OPTION: YNN_DOT}
    assert conv_options_for("cpu", (1, 2)) == {YNN_OPTION: YNN_DOT}
    assert conv_options_for("cpu", (0, 9)) == {}  # an unknown option would fail every compile
    assert conv_options_for("gpu", (0, 10)) == {} and conv_options_for("tpu", (0, 10)) == {}
    assert conv_options_for("cpu", (0, 10), choice="xla") == {}


def test_env_turns_it_off(monkeypatch):
    monkeypatch.setenv("VARJAX_CPU_CONV_KERNELS", "xla")
    assert conv_compiler_options() == {}


def test_a_program_compiled_with_it_runs_ynn_and_computes_the_same():
    opts = conv_compiler_options()
    assert opts == {YNN_OPTION: YNN_DOT}  # this suite runs on CPU with jaxlib >= 0.10

    def f(x, w, m):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y.reshape(-1, 8) @ m

    rng = np.random.default_rng(0)
    x, w, m = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(2, 16, 16, 8), (3, 3, 8, 8), (8, 8)])
    compiled = jax.jit(f, compiler_options=opts).lower(x, w, m).compile()
    assert "__ynn_fusion" in compiled.as_text()
    np.testing.assert_allclose(np.asarray(compiled(x, w, m)), np.asarray(jax.jit(f)(x, w, m)), rtol=1e-5, atol=1e-5)
