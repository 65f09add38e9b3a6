"""The float32 matmuls of the Pallas kernels: how they run on each target (`Dot`), emulated in
interpret mode, and what a kernel call costs: its matmul flops (`kernel_flops`) and the HBM
bytes of the blocks it visits (`kernel_bytes`), which a compiled kernel call carries in its
metadata for the program's cost count (training/roofline.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hyena_jax.model.kernels.plan import HIGHEST

# The metadata keys under which a compiled kernel call carries its matmul flops, the bf16-rate
# passes each of those matmuls costs (`Dot.passes`) and its HBM bytes.
KERNEL_FLOPS_KEY = "hyena_kernel_flops"
KERNEL_PASSES_KEY = "hyena_kernel_passes"
KERNEL_BYTES_KEY = "hyena_kernel_bytes"

# The matmul flops counted while `kernel_flops` traces a kernel (a stack: one entry per count).
_MATMUL_FLOPS: list[int] = []


def _round_tf32(x):
  """float32 -> nearest TF32 (8 exponent, 10 mantissa bits), as the tensor cores read it."""
  return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10)


@dataclasses.dataclass(frozen=True)
class Dot:
  """How the kernels' float32 matmuls run.

  precision: what jnp.dot is given (a Precision or a DotAlgorithmPreset). emulate: in interpret
  mode, round the operands as the target's matrix units would ('tf32': one TF32 pass, 'tf32x3':
  hi/lo TF32 split, three passes, 'bf16': one bfloat16 pass), so that errors measured on CPU are
  the target's (accumulation order is not emulated). passes: what one of these matmuls costs
  compiled, in matmuls at the chip's bf16 peak (three TF32 passes at half that rate: 6), for
  the roofline count. bf16x3: split each float32 operand into bfloat16 hi + lo parts and sum
  three one-pass products, a_hi b_hi + (a_hi b_lo + a_lo b_hi): ~16 mantissa bits (2^-16 ~ 1.5e-5
  relative) for three bf16 passes, half of Precision.HIGHEST's six on the MXU. Mosaic's dot takes
  only DEFAULT and HIGHEST, so the split is written out, and runs the same interpreted (products
  of bfloat16 values are exact in float32).
  """
  precision: object
  emulate: str | None = None
  passes: int = 6
  bf16x3: bool = False

  def __call__(self, a, b):
    if _MATMUL_FLOPS:  # counting a kernel's matmuls (kernel_flops), not lowering it
      _MATMUL_FLOPS[-1] += 2 * a.shape[0] * a.shape[1] * b.shape[1]
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    if self.bf16x3:
      a_hi, b_hi = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
      a_lo = (a - a_hi.astype(jnp.float32)).astype(jnp.bfloat16)
      b_lo = (b - b_hi.astype(jnp.float32)).astype(jnp.bfloat16)
      one_pass = functools.partial(dot, precision=jax.lax.Precision.DEFAULT)
      return one_pass(a_hi, b_hi) + (one_pass(a_hi, b_lo) + one_pass(a_lo, b_hi))
    if self.emulate is None:
      return dot(a, b, precision=self.precision)
    exact = functools.partial(dot, precision=HIGHEST)
    if self.emulate == "bf16":
      return exact(a.astype(jnp.bfloat16).astype(jnp.float32),
                   b.astype(jnp.bfloat16).astype(jnp.float32))
    a_hi, b_hi = _round_tf32(a), _round_tf32(b)
    if self.emulate == "tf32":
      return exact(a_hi, b_hi)
    # tf32x3 (Triton's TF32x3): a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi.
    a_lo, b_lo = _round_tf32(a - a_hi), _round_tf32(b - b_hi)
    return exact(a_hi, b_hi) + (exact(a_hi, b_lo) + exact(a_lo, b_hi))


class _ValueRef:
  """A block as a plain value, standing in for a Ref when `kernel_flops` traces a kernel."""

  def __init__(self, value=None, dtype=None):
    self.value = value
    self.dtype = dtype if value is None else value.dtype

  def __getitem__(self, index):
    return self.value

  def __setitem__(self, index, value):
    self.value = value


def kernel_flops(kernel, grid, in_specs, in_dtypes, out_dtypes) -> int:
  """Matmul flops of a pallas_call: one program's dots (traced abstractly, on values of the
  block shapes) times the grid size. The kernels' other arithmetic (twiddles, spectrum
  products) is O(block) and left out. XLA cannot count what a custom call does, so the
  compiled program carries this number for `training/roofline.py`."""

  def program(*blocks):
    kernel(*(_ValueRef(b) for b in blocks), *(_ValueRef(dtype=d) for d in out_dtypes))

  blocks = [jax.ShapeDtypeStruct(tuple(d for d in spec.block_shape if d is not None), dtype)
            for spec, dtype in zip(in_specs, in_dtypes)]
  _MATMUL_FLOPS.append(0)
  try:
    jax.eval_shape(program, *blocks)
  finally:
    per_program = _MATMUL_FLOPS.pop()
  return per_program * math.prod(grid)


def kernel_bytes(grid, specs, arrays) -> int:
  """HBM bytes of a pallas_call: for each operand and result (`specs[i]` of `arrays[i]`), the
  distinct blocks its index map visits over the grid, each moved once. An array the call
  writes only part of (a channel group's share of an aliased output) counts that part; a spec
  without a block shape (a raw HBM ref the kernel never reads) counts nothing."""
  points = np.indices(grid).reshape(len(grid), -1)
  total = 0
  for spec, array in zip(specs, arrays):
    if spec.block_shape is None:
      continue
    index = spec.index_map(*points)
    visited = np.stack([np.broadcast_to(np.asarray(i), points.shape[1:]) for i in index])
    block = math.prod(d for d in spec.block_shape if d is not None)
    total += np.unique(visited, axis=1).shape[1] * block * jnp.dtype(array.dtype).itemsize
  return int(total)
