"""The pallas_calls of the long convolution: grids, block specs and the tile constants of the
kernels in pallas_kernels.py, for the single-pass scheme and the three passes of the two-pass
scheme (run in channel groups that write the whole outputs in place), with each call's matmul
flops and HBM bytes in its metadata for the program's cost count (training/roofline.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from hyena_jax.model.kernels import pallas_kernels as kernels
from hyena_jax.model.kernels.matmul import (KERNEL_BYTES_KEY, KERNEL_FLOPS_KEY,
                                            KERNEL_PASSES_KEY, kernel_bytes, kernel_flops)
from hyena_jax.model.kernels.plan import Plan, Platform, odd_dft, odd_twiddle, tile_consts


def _compiler_params(platform: Platform, interpret: bool, ndim: int):
  if interpret:
    return None
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * ndim)
  from jax.experimental.pallas import triton as pltriton

  # Untuned: 4 warps suit the <= 64 x 64 tiles these block rules produce.
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _const_specs(arrays):
  """Whole-array blocks of 2-D constants with a constant index (fetched once per core on TPU)."""
  return [pl.BlockSpec(a.shape, lambda *_: (0, 0)) for a in arrays]


def _reverse_grid(spec: pl.BlockSpec) -> pl.BlockSpec:
  return pl.BlockSpec(spec.block_shape, lambda *ids, f=spec.index_map: f(*ids[::-1]))


def _call(kernel, grid, in_specs, out_specs, out_shape, ex, into=None):
  """pallas_call with grids written outermost-first, as TPU runs them.

  TPU iterates the last grid axis innermost, so a block that only changes with outer axes (a
  channel's filter while the batch varies) is fetched once. Triton maps the FIRST grid
  axis to the fastest-varying CUDA block index, so on GPU the grid is reversed to keep programs
  that share such blocks adjacent (L2 reuse).

  `into`: for each output, None or an array of its shape that the call writes into (aliased,
  never read): blocks the grid does not visit keep that array's values. A channel group writes
  its channels of the whole output this way.
  """
  plan, interpret = ex.plan, ex.interpret
  multi = isinstance(out_shape, (list, tuple))
  outs = list(out_shape) if multi else [out_shape]
  into = list(into) if into is not None else [None] * len(outs)
  if plan.platform == "gpu":
    grid = grid[::-1]
    in_specs = [_reverse_grid(s) for s in in_specs]
    out_specs = (_reverse_grid(out_specs) if isinstance(out_specs, pl.BlockSpec)
                 else [_reverse_grid(s) for s in out_specs])
  ospecs = list(out_specs) if multi else [out_specs]
  if interpret and ex.vma:
    # The interpreter starts outputs from fresh (unvarying) buffers, which check_vma refuses to
    # update with varying blocks inside a shard_map: every output gets a varying buffer.
    into = [x if x is not None else ex.consts([np.zeros(o.shape, o.dtype)])[0]
            for x, o in zip(into, outs)]
  aliased = [i for i, x in enumerate(into) if x is not None]
  n_in = len(in_specs)

  def without_aliased(*refs):  # the aliased buffers' refs are not the kernel's
    return kernel(*refs[:n_in], *refs[n_in + len(aliased):])

  # Never read: no DMA on TPU (raw HBM refs); on GPU a ref costs nothing until it is loaded.
  alias_specs = [pl.BlockSpec(memory_space=pl.ANY) if plan.platform == "tpu" and not interpret
                 else ospecs[i] for i in aliased]
  call = functools.partial(
      pl.pallas_call, without_aliased, grid=grid, in_specs=[*in_specs, *alias_specs],
      out_specs=out_specs, out_shape=out_shape,
      input_output_aliases={n_in + j: i for j, i in enumerate(aliased)})
  buffers = [into[i] for i in aliased]
  if interpret:
    return lambda *args: call(interpret=True)(*args, *buffers)

  def compiled(*args):
    # What the program's cost count (training/roofline.py) reads: the kernel's matmul flops, their
    # passes and the HBM bytes of the blocks it visits, in its metadata (kept in the compiled HLO
    # on TPU and GPU) and, for XLA's TPU scheduler, a cost estimate.
    flops = kernel_flops(kernel, grid, in_specs, [x.dtype for x in args],
                         [o.dtype for o in outs])
    moved = kernel_bytes(grid, [*in_specs, *ospecs], [*args, *outs])
    return call(
        compiler_params=_compiler_params(plan.platform, interpret, len(grid)),
        cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=moved),
        metadata={KERNEL_FLOPS_KEY: str(flops), KERNEL_PASSES_KEY: str(ex.dot.passes),
                  KERNEL_BYTES_KEY: str(moved)},
    )(*args, *buffers)
  return compiled


def _halves(x: jax.Array, plan: Plan, rows: int) -> jax.Array:
  """[B, C, L] -> [B, C, rows, n / (2 rows)]: zero-padded to n/2 (a free reshape when L = n/2)."""
  half = plan.n // 2
  if x.shape[-1] != half:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, half - x.shape[-1])])
  return x.reshape(*x.shape[:-1], rows, half // rows)


def _unhalves(y: jax.Array, plan: Plan) -> jax.Array:
  return y.reshape(*y.shape[:-2], plan.n // 2)[..., :plan.length]


def _scaled(k_eff: jax.Array, plan: Plan) -> jax.Array:
  """k_eff / n, so that the kernels' unscaled inverse DFT returns the convolution itself (a
  scalar literal inside a kernel breaks the interpreter under shard_map's check_vma)."""
  return k_eff.astype(jnp.float32) / plan.n


def _single_specs(ex):
  """What the single-pass forward and backward share: the tile constants and the block specs of
  a (batch, channel) row and of a channel's filter (both [ph, q], the input half of the tile)."""
  plan = ex.plan
  ph, q = plan.p // 2, plan.q
  consts = ex.consts(_tile_consts(plan.p, plan.q))
  row = pl.BlockSpec((None, None, ph, q), lambda ci, bi: (bi, ci, 0, 0))
  kspec = pl.BlockSpec((None, ph, q), lambda ci, bi: (ci, 0, 0))
  return consts, row, kspec, ph, q


def single_forward(u, k_eff, gate, ex):
  """u, gate: [B, C, L]; k_eff: [C, L] float32 (the skip term folded in) -> y [B, C, L]."""
  plan = ex.plan
  b, c, _ = u.shape
  consts, row, kspec, ph, q = _single_specs(ex)
  ins = [_halves(u, plan, ph), _halves(_scaled(k_eff, plan), plan, ph)]
  ins += [_halves(gate, plan, ph)] if gate is not None else []
  in_specs = [row, kspec] + ([row] if gate is not None else []) + _const_specs(consts)
  kernel = functools.partial(kernels.single_fwd_kernel, has_gate=gate is not None, dot=ex.dot)
  y = _call(kernel, (c, b), in_specs, row, ex.sds((b, c, ph, q), u.dtype),
            ex)(*ins, *consts)
  return _unhalves(y, plan)


def single_backward(u, gate, dy, k_eff, ex):
  """-> du, dgate [B, C, L] and dk_eff [C, L] float32."""
  plan = ex.plan
  b, c, _ = u.shape
  consts, row, kspec, ph, q = _single_specs(ex)
  shape = (b, c, ph, q)
  kernel = functools.partial(kernels.single_bwd_kernel, dot=ex.dot)
  du, dg, dkb = _call(
      kernel, (c, b), [row, row, row, kspec] + _const_specs(consts), [row] * 3,
      [ex.sds(shape, u.dtype), ex.sds(shape, gate.dtype),
       ex.sds(shape, jnp.float32)], ex,
  )(*(_halves(x, plan, ph) for x in (u, gate, dy, _scaled(k_eff, plan))), *consts)
  return _unhalves(du, plan), _unhalves(dg, plan), _unhalves(dkb, plan).sum(0) / plan.n


def _col_forward(xh, preh, ex, c0, cg, scale=1.0):
  """Channels c0 .. c0 + cg of xh (and preh), real [B, C, n1/2, m] (`_halves`), -> their column
  transform times `scale`, (re, im) [B, cg, kept, m] in `ex.spectra_dtype`: the first n1/2 of
  the n1 rows (the rest mirror them). `scale` rides on the DFT matrix (a power of two: exact)."""
  plan = ex.plan
  b = xh.shape[0]
  n1h, m, kept = plan.n1 // 2, plan.m, plan.kept
  bm, bk = plan.col_block, plan.row_block
  consts = ex.consts(_col_forward_consts(plan, scale))
  grid = (cg, b, m // bm, kept // bk)
  xspec = pl.BlockSpec((None, None, n1h, bm), lambda ci, bi, j, i: (bi, ci + c0, 0, j))
  gspec = pl.BlockSpec((bk, n1h), lambda ci, bi, j, i: (i, 0))
  tspec = pl.BlockSpec((bk, bm), lambda ci, bi, j, i: (i, j))
  ospec = pl.BlockSpec((None, None, bk, bm), lambda ci, bi, j, i: (bi, ci, i, j))
  ins = [xh] + ([preh] if preh is not None else [])
  kernel = functools.partial(kernels.col_fwd_kernel, has_pre=preh is not None, dot=ex.dot)
  out = ex.sds((b, cg, kept, m), ex.spectra_dtype)
  return _call(kernel, grid, [xspec] * len(ins) + [gspec, gspec, tspec, tspec], [ospec, ospec],
               [out, out], ex)(*ins, *consts)


def _shared(numpy_constants):
  """`numpy_constants`, made once per argument: a trace captures the same array object once, so
  every channel group's kernels share one copy in the program instead of holding their own
  (the column twiddles are [kept, m], half the FFT size: the copies came to 3.4 GB of constants
  in the lowering at 4M tokens on TPU, and a quarter of its compile time)."""
  return functools.lru_cache(maxsize=16)(numpy_constants)


@_shared
def _col_forward_consts(plan: Plan, scale: float = 1.0) -> tuple[np.ndarray, ...]:
  """The kept rows' half-bin-shifted column DFT G [kept, n1/2] (times `scale`) and twiddles
  T [kept, m]."""
  gr, gi = odd_dft(plan.n1)
  return (gr * np.float32(scale), gi * np.float32(scale),
          *odd_twiddle(plan.kept, plan.m, plan.n))


@_shared
def _col_inverse_consts(plan: Plan, scale: float = 1.0) -> tuple[np.ndarray, ...]:
  """H = 2 conj(G)^T [n1/2, kept] (times `scale`) and the twiddles T [kept, m] (conjugated in
  the kernel). Each kept row g1 stands for itself and its mirror n1 - 1 - g1, whose term in the
  inverse is the conjugate of its own: Re(both) = 2 Re(its own)."""
  gr, gi = odd_dft(plan.n1)
  return (np.float32(2 * scale) * gr.T, np.float32(-2 * scale) * gi.T,
          *odd_twiddle(plan.kept, plan.m, plan.n))


_tile_consts = _shared(tile_consts)


def _col_inverse(cr, ci, posth, out_dtype, ex, c0, into, channels, scale=1.0):
  """(re, im) [B, cg, kept, m] of a real signal's column spectrum (channels c0 .. c0 + cg) ->
  Re(inverse column DFT)[:, :, :n1/2] (* posth, [B, C, n1/2, m]) times `scale` (on the DFT
  matrix) written into those channels of `into` [B, C, n1/2, m] (C = `channels`; a new array
  when None, whose other channels are left for later groups to write)."""
  plan = ex.plan
  b, cg = cr.shape[:2]
  n1h, m, kept = plan.n1 // 2, plan.m, plan.kept
  bm, bk = plan.col_block, plan.row_block
  consts = ex.consts(_col_inverse_consts(plan, scale))
  grid = (cg, b, m // bm, n1h // bk)
  cspec = pl.BlockSpec((None, None, kept, bm), lambda ci, bi, j, i: (bi, ci, 0, j))
  ospec = pl.BlockSpec((None, None, bk, bm), lambda ci, bi, j, i: (bi, ci + c0, i, j))
  hspec = pl.BlockSpec((bk, kept), lambda ci, bi, j, i: (i, 0))
  tspec = pl.BlockSpec((kept, bm), lambda ci, bi, j, i: (0, j))
  ins = [cr, ci] + ([posth] if posth is not None else [])
  in_specs = [cspec, cspec] + ([ospec] if posth is not None else []) + [hspec, hspec, tspec,
                                                                         tspec]
  kernel = functools.partial(kernels.col_inv_kernel, has_post=posth is not None, dot=ex.dot)
  return _call(kernel, grid, in_specs, ospec, ex.sds((b, channels, n1h, m), out_dtype), ex,
               into=[into])(*ins, *consts)


def _row_specs(plan):
  p, q = plan.p, plan.q
  row = pl.BlockSpec((None, None, None, p, q), lambda ci, r, bi: (bi, ci, r, 0, 0))
  kspec = pl.BlockSpec((None, None, p, q), lambda ci, r, bi: (ci, r, 0, 0))
  return row, kspec


def _rows(x, plan):
  return x.reshape(*x.shape[:-1], plan.p, plan.q)


def _filter_columns(kh, d_bias, ex, c0, cg):
  """kh: the filter k as [1, C, n1/2, m] (`_halves`), d_bias: [C] float32 or None -> (re, im)
  of channels c0 .. c0 + cg of (k + d_bias delta) / n column-transformed, as rows
  [cg, kept, p, q]: the filter as the row kernels take it (they do its row DFT on-chip). One
  pass of the signal's column kernel (a batch of one) instead of a spectrum from XLA's FFT,
  whose rfft, conjugate half and tile-order transpose moved ~7x the bytes (issue 24).

  Neither the 1/n nor the skip term costs a pass over the filter: 1/n rides on the DFT matrix,
  and the skip term's delta (j1 = j2 = 0, where G and the twiddles are 1) is d_bias / n added to
  column 0 of every kept row, an update of cg x kept values in place.
  """
  plan = ex.plan
  re, im = _col_forward(kh, None, ex, c0, cg, scale=1.0 / plan.n)
  if d_bias is not None:
    skip = d_bias[c0:c0 + cg].astype(jnp.float32) / plan.n                # [cg]
    re = re.at[0, :, :, 0].set((re[0, :, :, 0].astype(jnp.float32) + skip[:, None]
                                ).astype(re.dtype))
  return tuple(x.reshape(cg, plan.kept, plan.p, plan.q) for x in (re, im))


def filter_columns(k, d_bias, ex):
  """Every channel's `_filter_columns` at once, k: [C, L] float32 -> (re, im) [C, kept, p, q]:
  what a forward in one channel group keeps for its backward, which then skips the filter's
  column pass (a read of k and a write of its columns, the size of one spectrum)."""
  plan = ex.plan
  kh = _halves(k.astype(jnp.float32)[None], plan, plan.n1 // 2)
  return _filter_columns(kh, d_bias, ex, 0, k.shape[0])


def signal_columns(u, ex):
  """u: [B, C, L] -> its column transform (re, im) [B, C, kept, m]: what a forward in one channel
  group keeps for its backward (instead of u), which then skips that column pass."""
  return _col_forward(_halves(u, ex.plan, ex.plan.n1 // 2), None, ex, 0, u.shape[1])


def _in_groups(groups, channels, arrays, step):
  """Runs `step(c0, cg, arrays, partial)` for each group of cg = channels / groups channels, one
  group after another: the next group's inputs pass an optimization barrier with the previous
  group's outputs, so XLA cannot start its kernels early and hold two groups' intermediates at
  once. `partial` is the previous group's outputs (None for the first); returns the last's."""
  cg = channels // groups
  partial = None
  for g in range(groups):
    if partial is not None:
      partial, arrays = jax.lax.optimization_barrier((partial, arrays))
    partial = step(g * cg, cg, arrays, partial)
  return partial


def two_pass_forward(u, k, d_bias, gate, ex, groups=1, fcols=None, ucols=None):
  """u, gate: [B, C, L]; k: [C, L] float32 and d_bias: [C] float32 or None (the skip term) ->
  y [B, C, L]. The channels run in `groups` groups (their intermediates, ~4 n bytes per channel
  and sequence each, exist for one group at a time); every group reads and writes the whole
  arrays in place, so grouping copies nothing. `fcols`, `ucols`: `filter_columns(k, d_bias)` and
  `signal_columns(u)` when the caller has them (one group only)."""
  plan = ex.plan
  b, c, _ = u.shape
  n1h = plan.n1 // 2
  consts = ex.consts(_tile_consts(plan.p, plan.q))
  row, kspec = _row_specs(plan)
  halves = (_halves(u, plan, n1h), _halves(k.astype(jnp.float32)[None], plan, n1h),
            None if gate is None else _halves(gate, plan, n1h), d_bias)

  def step(c0, cg, arrays, y):
    uh, kh, gh, d = arrays
    out = ex.sds((b, cg, plan.kept, plan.p, plan.q), ex.spectra_dtype)
    ar, ai = ucols if ucols is not None else _col_forward(uh, None, ex, c0, cg)
    cr, ci = _call(
        functools.partial(kernels.row_fwd_kernel, dot=ex.dot), (cg, plan.kept, b),
        [row, row, kspec, kspec] + _const_specs(consts), [row, row], [out, out], ex,
    )(_rows(ar, plan), _rows(ai, plan),
      *(fcols if fcols is not None else _filter_columns(kh, d, ex, c0, cg)), *consts)
    flat = lambda x: x.reshape(b, cg, plan.kept, plan.m)  # noqa: E731
    return _col_inverse(flat(cr), flat(ci), gh, u.dtype, ex, c0, y, c)

  return _unhalves(_in_groups(groups, c, halves, step), plan)


def two_pass_backward(u, gate, dy, k, d_bias, ex, groups=1, fcols=None, ucols=None):
  """-> du, dgate [B, C, L] and dk_eff [C, L] float32 (the gradient of k + d_bias delta), in
  `groups` channel groups as the forward; with the forward's `fcols` and `ucols` (one group),
  k and u are not read and may be None (du takes dy's dtype, which is u's)."""
  plan = ex.plan
  b, c, _ = dy.shape
  n1h = plan.n1 // 2
  consts = ex.consts(_tile_consts(plan.p, plan.q))
  row, kspec = _row_specs(plan)
  kh = None if fcols is not None else _halves(k.astype(jnp.float32)[None], plan, n1h)
  uh = None if ucols is not None else _halves(u, plan, n1h)
  halves = (uh,) + tuple(_halves(x, plan, n1h) for x in (gate, dy)) + (kh, d_bias)

  def step(c0, cg, arrays, partial):
    uh, gh, dyh, kh, d = arrays
    du, dg, dkb = partial if partial is not None else (None, None, None)
    aur, aui = ucols if ucols is not None else _col_forward(uh, None, ex, c0, cg)
    azr, azi = _col_forward(dyh, gh, ex, c0, cg)
    out = ex.sds((b, cg, plan.kept, plan.p, plan.q), ex.spectra_dtype)
    outs = _call(
        functools.partial(kernels.row_bwd_kernel, dot=ex.dot), (cg, plan.kept, b),
        [row] * 4 + [kspec, kspec] + _const_specs(consts), [row] * 6, [out] * 6, ex,
    )(*(_rows(x, plan) for x in (aur, aui, azr, azi)),
      *(fcols if fcols is not None else _filter_columns(kh, d, ex, c0, cg)), *consts)
    flat = [x.reshape(b, cg, plan.kept, plan.m) for x in outs]
    return (_col_inverse(flat[2], flat[3], None, dy.dtype, ex, c0, du, c),
            _col_inverse(flat[0], flat[1], dyh, gate.dtype, ex, c0, dg, c),
            # 1/n (the inverse DFT's normalisation) on the DFT matrix, not a pass over dk.
            _col_inverse(flat[4], flat[5], None, jnp.float32, ex, c0, dkb, c, 1.0 / plan.n))

  du, dg, dkb = _in_groups(groups, c, halves, step)
  return _unhalves(du, plan), _unhalves(dg, plan), _unhalves(dkb, plan).sum(0)

