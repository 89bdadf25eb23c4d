"""AOT compilation for TPU topologies on CPU (needs libtpu from `jax[tpu]`; skips with the reason otherwise)."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from lwjax.launch import aot

AVAILABLE, WHY = aot.libtpu_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"libtpu cannot load: {WHY}")


@pytest.mark.parametrize("topology,chips", [("v5e:1x1", 1), ("v5p:2x2x1", 4)])
def test_topologies_have_their_chips(topology, chips):
  assert len(aot.tpu_devices(topology)) == chips


def test_a_pallas_kernel_compiles_for_tpu_and_reports_memory():
  def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  def f(x):
    spec = pl.BlockSpec((128, 128), lambda i: (i, 0))
    return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
                          in_specs=[spec], out_specs=spec)(x)
  compiled = aot.compile_for_tpu(f, jax.ShapeDtypeStruct((256, 128), jnp.float32))
  assert compiled.memory_analysis().output_size_in_bytes == 256 * 128 * 4
