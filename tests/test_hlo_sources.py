"""vpd_jax.tools.hlo_sources: kernel names of a compiled step traced back to JAX op names and source lines."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpd_jax.tools.hlo_sources import hlo_sources, kernel_name


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = jnp.tanh(jnp.transpose(x, (0, 2, 1)))  # the marked line
        return nn.Dense(8, name="proj")(y)


def test_kernels_map_to_their_op_names_module_paths_and_lines():
    x = jnp.ones((4, 8, 16))
    block = _Block()
    params = block.init(jax.random.PRNGKey(0), x)

    def loss(p, x):
        return (block.apply(p, x) ** 2).sum()

    # A persistent-cache hit would bring back the metadata (line numbers) of whatever source compiled it first.
    keep = jax.config.jax_compilation_cache_include_metadata_in_key
    jax.config.update("jax_compilation_cache_include_metadata_in_key", True)
    try:
        text = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    finally:
        jax.config.update("jax_compilation_cache_include_metadata_in_key", keep)
    where = hlo_sources(text)
    src, first = inspect.getsourcelines(_Block.__call__)
    line = first + next(i for i, s in enumerate(src) if "the marked line" in s)
    assert where, "no instruction was described"
    assert all(k == kernel_name(k) for k in where)  # profile-style names: no dots or dashes
    marked = [v for v in where.values() if f"test_hlo_sources.py:{line} (_Block.__call__)" in v]
    assert any("_Block" in v.split(" @ ")[0] for v in marked), marked
    assert any("/proj/" in v and "dot_general" in v for v in where.values())  # the Flax module path is kept


def test_reads_inline_source_metadata_and_fused_computation_roots():
    text = """HloModule m

%fused_computation.7 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %a = f32[4]{0} add(%p, %p), metadata={op_name="jit(f)/add" source_file="/x/model.py" source_line=3}
  ROOT %t = f32[4]{0} transpose(%a), dimensions={0}, metadata={op_name="jit(f)/blk/transpose" source_file="/x/model.py" source_line=9}
}

ENTRY %main.2 (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %input_transpose_fusion.29 = f32[4]{0} fusion(%x), kind=kInput, calls=%fused_computation.7
}
"""
    where = hlo_sources(text)
    assert where["input_transpose_fusion_29"] == "jit(f)/blk/transpose @ model.py:9"
    assert where["a"] == "jit(f)/add @ model.py:3"
