"""The program cost counter (`training/roofline.py`) against XLA's own count, on the CPU.

XLA's HloCostAnalysis is exact for straight-line programs and counts a while loop's body once;
the counter must equal it where there is no loop, multiply bodies by their trip counts where
there is, and count what XLA cannot see (GEMM and Pallas custom calls) from their shapes and
metadata.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from hyena_jax.model.kernels import matmul, pallas_calls, pallas_conv, pallas_kernels
from hyena_jax.training import roofline


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile()


def _layers(x, w, *, unroll):
  """3 inner x 5 outer steps of tanh(x @ w): a nested scan, or the same unrolled."""
  def outer(c, _):
    def inner(d, _):
      return jnp.tanh(d @ w), None
    return jax.lax.scan(inner, c, None, length=3, unroll=unroll)[0] * 2.0, None
  return jax.lax.scan(outer, x, None, length=5, unroll=unroll)[0].sum()


X = jnp.ones((64, 64), jnp.float32)


def test_without_loops_the_count_is_xlas():
  compiled = _compiled(lambda x, w: _layers(x, w, unroll=True), X, X)
  xla = compiled.cost_analysis()
  cost = roofline.program_cost(compiled.as_text())
  assert cost.loops == 0 and cost.unknown_loops == 0
  assert cost.flops == xla["flops"] and cost.bytes == xla["bytes accessed"]


def test_loop_bodies_count_their_trip_counts_nested():
  unrolled = _compiled(lambda x, w: _layers(x, w, unroll=True), X, X)
  scanned = _compiled(lambda x, w: _layers(x, w, unroll=1), X, X)
  matmul = 2 * 64 ** 3
  # XLA's own count sees one inner step: fewer than two matmuls.
  assert scanned.cost_analysis()["flops"] < 2 * matmul
  cost = roofline.program_cost(scanned.as_text())
  assert cost.loops == 2 and cost.unknown_loops == 0
  # 15 matmuls plus elementwise work: the unrolled program's count, up to the loop counters'
  # adds and compares (a few per iteration).
  expected = unrolled.cost_analysis()["flops"]
  assert expected > 15 * matmul
  assert 0 <= cost.flops - expected <= 4 * 20, (cost.flops, expected)


def test_a_trip_count_is_read_off_the_condition_when_xla_does_not_record_it():
  """TPU's optimized HLO carries no known_trip_count: `counter < N` in the condition gives it."""
  text = _compiled(lambda x, w: _layers(x, w, unroll=1), X, X).as_text()
  stripped = re.sub(r',?"known_trip_count":\{"n":"\d+"\}', "", text)
  assert "known_trip_count" not in stripped
  assert roofline.program_cost(stripped).flops == roofline.program_cost(text).flops


_CUSTOM_CALLS = """HloModule custom_calls

ENTRY %main (a: f32[32,64], b: f32[64,16], u: bf16[4,8,256]) -> (f32[32,16], bf16[4,8,256], bf16[4,8,256]) {
  %a = f32[32,64]{1,0} parameter(0)
  %b = f32[64,16]{1,0} parameter(1)
  %u = bf16[4,8,256]{2,1,0} parameter(2)
  %gemm = (f32[32,16]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %out = f32[32,16]{1,0} get-tuple-element(%gemm), index=0
  %kernel = bf16[4,8,256]{2,1,0} custom-call(%u), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "k", serialized_metadata = "{\\22hyena_kernel_flops\\22: \\22123456\\22}"}
  %said = bf16[4,8,256]{2,1,0} custom-call(%u), custom_call_target="__gpu$xla.gpu.triton", backend_config={name = "k2", serialized_metadata = "{\\22hyena_kernel_flops\\22: \\221000\\22, \\22hyena_kernel_passes\\22: \\222\\22, \\22hyena_kernel_bytes\\22: \\22777\\22}"}
  ROOT %t = (f32[32,16]{1,0}, bf16[4,8,256]{2,1,0}, bf16[4,8,256]{2,1,0}) tuple(%out, %kernel, %said)
}
"""


def test_gemm_and_kernel_custom_calls_are_counted_from_their_shapes_and_metadata():
  """A kernel's flops come from its metadata; its bytes and passes too where it says them
  (%said), else its operands and results and six passes (float32-accurate matmuls)."""
  cost = roofline.program_cost(_CUSTOM_CALLS)
  gemm_flops, kernel_flops = 2 * 32 * 64 * 16, 123456 + 1000
  assert cost.flops == gemm_flops + kernel_flops and cost.kernel_flops == kernel_flops
  assert cost.kernel_pass_flops == 123456 * 6 + 1000 * 2
  gemm_bytes = 4 * (32 * 64 + 64 * 16 + 32 * 16)       # operands + result, not the workspace
  kernel_bytes = 2 * 2 * (4 * 8 * 256) + 777            # bf16 in and out; what %said says
  assert cost.kernel_bytes == kernel_bytes
  # Plus XLA's own count of the rest (the root tuple), where each custom call counted -1.
  from jax._src.lib import _jax
  from jaxlib import _hlo
  xla = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client,
                                      _hlo.hlo_module_from_text(_CUSTOM_CALLS))
  assert xla["flops"] == -3  # XLA's "unknown", once per custom call
  assert cost.bytes == gemm_bytes + kernel_bytes + (xla["bytes accessed"] + 3)


def test_a_kernels_flops_are_its_matmuls_times_its_grid():
  """The single-pass forward on one [p/2, q] half tile: F_p(half) and F_q forward of the signal
  and of the filter (2 x (2 p^2 q + 8 p q^2)), F_q and F_p(half) inverse (8 p q^2 + 2 p^2 q),
  per (batch, channel) program."""
  plan = pallas_conv.make_plan(1000, "gpu")
  ex = pallas_conv._Exec(plan, False, pallas_conv._dot_for("gpu", "highest", False))
  consts, row, kspec, _, _ = pallas_calls._single_specs(ex)
  in_specs = [row, kspec, row] + pallas_calls._const_specs(consts)
  kernel = functools.partial(pallas_kernels.single_fwd_kernel, has_gate=True, dot=ex.dot)
  flops = matmul.kernel_flops(kernel, (3, 2), in_specs, [jnp.float32] * len(in_specs),
                                      [jnp.float32])
  p, q = plan.p, plan.q
  assert flops == 3 * 2 * (6 * p * p * q + 24 * p * q * q)


def test_a_kernels_bytes_are_the_blocks_it_visits():
  """A channel group's call reads and writes its own channels of whole arrays (an aliased
  output among them): its bytes are those blocks, not the arrays; a constant every program
  reads counts once; a raw HBM ref (an aliased buffer the kernel never reads) counts nothing."""
  from jax.experimental import pallas as pl
  whole = jax.ShapeDtypeStruct((2, 8, 64), jnp.bfloat16)        # [batch, channels, length]
  const = jax.ShapeDtypeStruct((16, 64), jnp.float32)
  group = pl.BlockSpec((None, None, 64), lambda c, b: (b, c + 4, 0))   # channels 4 and 5
  every = pl.BlockSpec((16, 64), lambda c, b: (0, 0))
  unread = pl.BlockSpec(memory_space=pl.ANY)
  moved = matmul.kernel_bytes((2, 2), [group, every, unread, group], [whole, const, whole, whole])
  assert moved == 2 * (2 * 2 * 64 * 2) + 16 * 64 * 4


def test_the_bound_is_the_slower_of_compute_and_memory():
  peak = roofline.Peak("test", bf16_flops=1e12, hbm_bytes_per_s=1e9)
  memory_bound = roofline.roofline(roofline.Cost(flops=1e9, bytes=1e9), peak, tokens=1000)
  assert memory_bound["bound"] == "memory" and memory_bound["bound_s"] == pytest.approx(1.0)
  assert memory_bound["tokens_per_s"] == pytest.approx(1000.0)
  # Kernel matmuls cost the bf16 passes they say (here 6 each: float32-accurate).
  compute_bound = roofline.roofline(
      roofline.Cost(flops=3e12, bytes=1e6, kernel_flops=1e12, kernel_pass_flops=6e12), peak,
      tokens=1000)
  assert compute_bound["bound"] == "compute"
  assert compute_bound["compute_s"] == pytest.approx(2.0 + 6.0)
