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
  ROOT %t = f32[4]{0} transpose(%a), dimensions={0}, \
metadata={op_name="jit(f)/blk/transpose" source_file="/x/model.py" source_line=9}
}

ENTRY %main.2 (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  ROOT %input_transpose_fusion.29 = f32[4]{0} fusion(%x), kind=kInput, calls=%fused_computation.7
}
"""
    where = hlo_sources(text)
    assert where["input_transpose_fusion_29"] == "jit(f)/blk/transpose @ model.py:9"
    assert where["a"] == "jit(f)/add @ model.py:3"


def test_entry_output_bytes_and_the_summary(tmp_path, capsys):
    from vpd_jax.tools.hlo_sources import entry_outputs, main

    text = """HloModule m

%fused_computation.7 (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(%p), dimensions={1,0}, \
metadata={op_name="jit(f)/blocks_3/transpose" source_file="/x/model.py" source_line=9}
}

%fused_computation.8 (p: f32[4,8]) -> (bf16[8,4], f32[4,8]) {
  %p = f32[4,8]{1,0} parameter(0)
  %c = bf16[4,8]{1,0} convert(%p), \
metadata={op_name="jit(f)/blocks_4/transpose" source_file="/x/model.py" source_line=9}
  %t = bf16[8,4]{1,0} transpose(%c), dimensions={1,0}, \
metadata={op_name="jit(f)/blocks_4/transpose" source_file="/x/model.py" source_line=9}
  ROOT %r = (bf16[8,4]{1,0}, f32[4,8]{1,0}) tuple(%t, %p)
}

ENTRY %main.2 (x: f32[4,8]) -> f32[8,4] {
  %x = f32[4,8]{0,1} parameter(0)
  %input_transpose_fusion.1 = (bf16[8,4]{1,0}, f32[4,8]{1,0}) fusion(%x), kind=kInput, calls=%fused_computation.8
  ROOT %input_transpose_fusion.29 = f32[8,4]{1,0} fusion(%x), kind=kInput, calls=%fused_computation.7
}
"""
    rows = entry_outputs(text, "transpose")
    assert rows == [("input_transpose_fusion.1", "fusion", 8 * 4 * 2 + 4 * 8 * 4),
                    ("input_transpose_fusion.29", "fusion", 8 * 4 * 4)]
    path = tmp_path / "step.hlo.txt"
    path.write_text(text)
    assert main([str(path), "--match", "transpose"]) == 0
    out = capsys.readouterr().out
    assert "2 entry instructions match 'transpose'" in out
    # blocks_3 and blocks_4 fold into one group (the fusion without an op_name ROOT falls back to its first).
    assert "x2" in out and "jit(f)/blocks_N/transpose @ model.py:9" in out


def test_traffic_counts_every_kernels_operands_and_outputs_by_kind(tmp_path, capsys):
    from vpd_jax.tools.hlo_sources import entry_traffic, main, traffic_summary, traffic_table

    text = """HloModule m

%fused_computation.1 (p: bf16[2,8]) -> bf16[8,2] {
  %p = bf16[2,8]{1,0} parameter(0)
  ROOT %t = bf16[8,2]{1,0} transpose(%p), dimensions={1,0}
}

ENTRY %main.2 (x: f32[2,8], w: bf16[8,4]) -> (f32[2,4], bf16[8,2]) {
  %x = f32[2,8]{1,0} parameter(0)
  %w = bf16[8,4]{1,0} parameter(1)
  %wrapped_convert.3 = bf16[2,8]{1,0} fusion(%x), kind=kLoop, calls=%wrapped_convert_computation.3
  %b = bf16[8,2]{0,1} bitcast(%wrapped_convert.3)
  %custom-call.4 = (f32[2,4]{1,0}, s8[16]{0}) custom-call(%wrapped_convert.3, %w), \
custom_call_target="__cublas$lt$matmul", backend_config={"x":"(y)"}
  %get-tuple-element.5 = f32[2,4]{1,0} get-tuple-element(%custom-call.4), index=0
  %input_transpose_fusion.6 = bf16[8,2]{1,0} fusion(%wrapped_convert.3), kind=kInput, calls=%fused_computation.1
  %copy.7 = bf16[8,2]{1,0} copy(%b)
  ROOT %tuple.8 = (f32[2,4]{1,0}, bf16[8,2]{1,0}) tuple(%get-tuple-element.5, %input_transpose_fusion.6)
}
"""
    rows = entry_traffic(text)
    assert rows == [("wrapped_convert.3", "elementwise", 64, 32),
                    ("custom-call.4", "gemm", 32 + 64, 32 + 16),
                    ("input_transpose_fusion.6", "transpose", 32, 32),
                    ("copy.7", "copy", 32, 32)]
    assert traffic_summary(text) == (4, (64 + 32) + (32 + 32) + (32 + 32))  # the GEMM is not memory-bound
    table = traffic_table(rows, bandwidth=1e12)
    assert "memory-bound" in table.splitlines()[-1] and " 3 " in table.splitlines()[-1]  # the gemm is not counted
    path = tmp_path / "step.hlo.txt"
    path.write_text(text)
    assert main([str(path), "--traffic"]) == 0
    assert "transpose" in capsys.readouterr().out


def test_traffic_by_module_and_convolution_flops():
    from vpd_jax.tools.hlo_sources import conv_flops, traffic_by_module

    text = """HloModule m

ENTRY %main.9 (x: bf16[1,4,4,2], w: bf16[3,3,2,5], mu: f32[5]) -> bf16[1,4,4,5] {
  %x = bf16[1,4,4,2]{3,2,1,0} parameter(0)
  %w = bf16[3,3,2,5]{3,2,1,0} parameter(1)
  %opt_state_mu.1 = f32[5]{0} parameter(2)
  %conv.1 = (bf16[1,4,4,5]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), \
window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %gte.2 = bf16[1,4,4,5]{3,2,1,0} get-tuple-element(%conv.1), index=0
  %conv.3 = (bf16[1,4,4,2]{3,2,1,0}, u8[0]{0}) custom-call(%gte.2, %w), \
window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardInput"
  %loop_add_fusion.4 = bf16[1,4,4,5]{3,2,1,0} fusion(%gte.2), kind=kLoop, calls=%f4, \
metadata={op_name="jit(step)/jvp(Model)/unet.features/blk/add"}
  %loop_mul_fusion.5 = bf16[1,4,4,5]{3,2,1,0} fusion(%loop_add_fusion.4), kind=kLoop, calls=%f5, \
metadata={op_name="jit(step)/transpose(jvp(Model))/head/conv/mul"}
  %loop_adam_fusion.6 = f32[5]{0} fusion(%opt_state_mu.1), kind=kLoop, calls=%f6, metadata={op_name="jit(step)/mul"}
  ROOT %copy.7 = bf16[1,4,4,5]{3,2,1,0} copy(%loop_mul_fusion.5)
}
"""
    flops = conv_flops(text)
    # 2 * |output| * |filter| / output features = 2 * 80 * 90 / 5, for the forward and the input gradient alike
    assert flops == {"__cudnn$convForward": 2880.0, "__cudnn$convBackwardInput": 2 * 80 * 90 / 5}
    groups = {g: (n, b) for g, n, b in traffic_by_module(text)}
    assert groups["forward unet"] == (1, 160 + 160)
    assert groups["backward head"] == (1, 160 + 160)
    assert groups["optimizer update"] == (1, 20 + 20)
    assert groups["other"] == (1, 160 + 160)  # the copy: no op name
