"""The Pallas kernels of the long convolution and their pallas_calls: DFTs as matmuls on [p, q]
tiles (single pass), or column / row / inverse-column passes through HBM (two pass), forward and
backward (`pallas_conv`'s docstring has the maths). The filter enters as k_eff / n: a real half
tile (single pass) or its column transform (two pass, by the signal's own column kernel); its
tile DFT is done on-chip beside the signal's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from hyena_jax.model.kernels.matmul import KERNEL_FLOPS_KEY, Dot, kernel_flops
from hyena_jax.model.kernels.plan import Plan, Platform, dft, tile_consts, twiddle


def _mm(a, b, dot: Dot):
  return dot(a, b)


def _cmul(ar, ai, br, bi):
  return ar * br - ai * bi, ar * bi + ai * br


def _cmul_conj(ar, ai, br, bi):
  """a * conj(b)."""
  return ar * br + ai * bi, ai * br - ar * bi


class _Tile:
  """The [p, q] four-step DFT on values from the constant refs (each loaded once, on first use,
  so a kernel only reads the constants it needs)."""

  _NAMES = ("fpr", "fpi", "fphr", "fphi", "fhpr", "fhpi", "fqr", "fqi", "twr", "twi")

  def __init__(self, refs, dot):
    self._refs = dict(zip(self._NAMES, refs, strict=True))
    self._values = {}
    self.dot = dot

  def __getattr__(self, name):
    if name not in self._NAMES:
      raise AttributeError(name)
    if name not in self._values:
      self._values[name] = self._refs[name][...]
    return self._values[name]

  def _mm(self, a, b):
    return _mm(a, b, self.dot)

  def _row_dft(self, ar, ai):
    """(a * T) @ F_q."""
    ar, ai = _cmul(ar, ai, self.twr, self.twi)
    mm = self._mm
    return mm(ar, self.fqr) - mm(ai, self.fqi), mm(ar, self.fqi) + mm(ai, self.fqr)

  def forward_real_half(self, x):
    """x: [p/2, q] real, the first half of a zero-padded tile -> spectrum (re, im) [p, q]."""
    return self._row_dft(self._mm(self.fphr, x), self._mm(self.fphi, x))

  def forward(self, xr, xi):
    """Full complex tile [p, q] -> spectrum [p, q]."""
    mm = self._mm
    ar = mm(self.fpr, xr) - mm(self.fpi, xi)
    ai = mm(self.fpr, xi) + mm(self.fpi, xr)
    return self._row_dft(ar, ai)

  def _row_idft(self, yr, yi):
    """(y @ conj(F_q)) * conj(T)."""
    mm = self._mm
    cr = mm(yr, self.fqr) + mm(yi, self.fqi)
    ci = mm(yi, self.fqr) - mm(yr, self.fqi)
    return _cmul_conj(cr, ci, self.twr, self.twi)

  def inverse_real_half(self, yr, yi):
    """Spectrum [p, q] -> real part of the first p/2 rows of the (unscaled) inverse DFT."""
    cr, ci = self._row_idft(yr, yi)
    return self._mm(self.fhpr, cr) + self._mm(self.fhpi, ci)

  def inverse(self, yr, yi):
    """Spectrum [p, q] -> full complex (unscaled) inverse DFT [p, q]."""
    mm = self._mm
    cr, ci = self._row_idft(yr, yi)
    return mm(self.fpr, cr) + mm(self.fpi, ci), mm(self.fpr, ci) - mm(self.fpi, cr)


# ----------------------------------------------------------------------------------------------
# Kernels. Refs arrive as (inputs..., outputs...); tile constants are the last inputs.


def _single_fwd_kernel(*refs, has_gate, dot):
  """y = IDFT(DFT(u) DFT(k / n))[:n/2] * gate on one [p/2, q] half tile."""
  u_ref, k_ref = refs[:2]
  gate_ref = refs[2] if has_gate else None
  consts = refs[2 + has_gate:-1]
  (y_ref,) = refs[-1:]
  tile = _Tile(consts, dot)
  ur, ui = tile.forward_real_half(u_ref[...].astype(jnp.float32))
  y = tile.inverse_real_half(*_cmul(ur, ui, *tile.forward_real_half(k_ref[...])))
  if has_gate:
    y = y * gate_ref[...].astype(jnp.float32)
  y_ref[...] = y.astype(y_ref.dtype)


def _single_bwd_kernel(u_ref, g_ref, dy_ref, k_ref, *refs, dot):
  """du = corr(dy g, k), dg = dy conv(u, k), dkb = corr(dy g, u) for one (batch, channel) row."""
  consts, (du_ref, dg_ref, dkb_ref) = refs[:-3], refs[-3:]
  tile = _Tile(consts, dot)
  u = u_ref[...].astype(jnp.float32)
  dy = dy_ref[...].astype(jnp.float32)
  ur, ui = tile.forward_real_half(u)
  zr, zi = tile.forward_real_half(dy * g_ref[...].astype(jnp.float32))
  kr, ki = tile.forward_real_half(k_ref[...])
  s = tile.inverse_real_half(*_cmul(ur, ui, kr, ki))
  dg_ref[...] = (dy * s).astype(dg_ref.dtype)
  du_ref[...] = tile.inverse_real_half(*_cmul_conj(zr, zi, kr, ki)).astype(du_ref.dtype)
  # Unscaled (x n): the 1/n is applied after the batch sum, outside (a scalar literal inside a
  # kernel breaks the interpreter under shard_map's check_vma).
  dkb_ref[...] = tile.inverse_real_half(*_cmul_conj(zr, zi, ur, ui))


def _col_fwd_kernel(*refs, has_pre, dot):
  """A[rows, cols] = T * (F_n1[rows, :n1/2] @ x[:n1/2, cols]) for x = u (or u * pre), rows among
  the kept ones."""
  x_ref = refs[0]
  pre_ref = refs[1] if has_pre else None
  gr_ref, gi_ref, twr_ref, twi_ref, ar_ref, ai_ref = refs[1 + has_pre:]
  x = x_ref[...].astype(jnp.float32)
  if has_pre:
    x = x * pre_ref[...].astype(jnp.float32)
  ar = _mm(gr_ref[...], x, dot)
  ai = _mm(gi_ref[...], x, dot)
  ar_ref[...], ai_ref[...] = _cmul(ar, ai, twr_ref[...], twi_ref[...])


def _row_fwd_kernel(ar_ref, ai_ref, kr_ref, ki_ref, *refs, dot):
  """One row of the column-transformed signal a and filter: row IDFT(row DFT(a) row DFT(k)),
  complex [p, q]."""
  consts, (cr_ref, ci_ref) = refs[:-2], refs[-2:]
  tile = _Tile(consts, dot)
  xr, xi = tile.forward(ar_ref[...], ai_ref[...])
  kr, ki = tile.forward(kr_ref[...], ki_ref[...])
  cr_ref[...], ci_ref[...] = tile.inverse(*_cmul(xr, xi, kr, ki))


def _row_bwd_kernel(aur_ref, aui_ref, azr_ref, azi_ref, kr_ref, ki_ref, *refs, dot):
  """Row-pass of the backward: U K (for dgate), Z conj(K) (for du), Z conj(U) (for dk, times n)."""
  consts, outs = refs[:-6], refs[-6:]
  tile = _Tile(consts, dot)
  ur, ui = tile.forward(aur_ref[...], aui_ref[...])
  zr, zi = tile.forward(azr_ref[...], azi_ref[...])
  kr, ki = tile.forward(kr_ref[...], ki_ref[...])
  wr, wi = _cmul_conj(zr, zi, ur, ui)
  # The dk product is left unscaled (x n), as in _single_bwd_kernel.
  products = (_cmul(ur, ui, kr, ki), _cmul_conj(zr, zi, kr, ki), (wr, wi))
  for i, spec in enumerate(products):
    outs[2 * i][...], outs[2 * i + 1][...] = tile.inverse(*spec)


def _col_inv_kernel(*refs, has_post, dot):
  """y[rows, cols] = Re(H[rows, :] @ (conj(T) * C[:, cols])) (* post) over the kept rows of C,
  given as its first n1/2 rows and its tail: H = conj(F_n1) with the columns of the dropped
  rows' mirrors doubled (`_inverse_weights`)."""
  cr_ref, ci_ref, tr_ref, ti_ref = refs[:4]
  post_ref = refs[4] if has_post else None
  hr_ref, hi_ref, htr_ref, hti_ref, twr_ref, twi_ref, ttr_ref, tti_ref, y_ref = \
      refs[4 + has_post:]
  cr, ci = _cmul_conj(cr_ref[...], ci_ref[...], twr_ref[...], twi_ref[...])
  tr, ti = _cmul_conj(tr_ref[...], ti_ref[...], ttr_ref[...], tti_ref[...])
  y = (_mm(hr_ref[...], cr, dot) + _mm(hi_ref[...], ci, dot)
       + _mm(htr_ref[...], tr, dot) + _mm(hti_ref[...], ti, dot))
  if has_post:
    y = y * post_ref[...].astype(jnp.float32)
  y_ref[...] = y.astype(y_ref.dtype)


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers.


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


def _call(kernel, grid, in_specs, out_specs, out_shape, ex):
  """pallas_call with grids written outermost-first, as TPU runs them.

  TPU iterates the last grid axis innermost, so a block that only changes with outer axes (a
  channel's filter spectrum while the batch varies) is fetched once. Triton maps the FIRST grid
  axis to the fastest-varying CUDA block index, so on GPU the grid is reversed to keep programs
  that share such blocks adjacent (L2 reuse).
  """
  plan, interpret = ex.plan, ex.interpret
  if plan.platform == "gpu":
    grid = grid[::-1]
    in_specs = [_reverse_grid(s) for s in in_specs]
    out_specs = (_reverse_grid(out_specs) if isinstance(out_specs, pl.BlockSpec)
                 else [_reverse_grid(s) for s in out_specs])
  if not interpret:
    def compiled(*args):
      # What the program's cost count (training/roofline.py) reads: the kernel's matmul flops
      # in its metadata (kept in the compiled HLO on TPU and GPU) and, for XLA's TPU scheduler,
      # a cost estimate.
      outs = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
      flops = kernel_flops(kernel, grid, in_specs, [x.dtype for x in args],
                           [o.dtype for o in outs])
      moved = sum(x.size * x.dtype.itemsize for x in (*args, *outs))
      return pl.pallas_call(
          kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
          compiler_params=_compiler_params(plan.platform, interpret, len(grid)),
          cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=moved),
          metadata={KERNEL_FLOPS_KEY: str(flops)},
      )(*args)
    return compiled
  if not ex.vma:
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=True)
  # The interpreter starts outputs from fresh (unvarying) buffers, which check_vma refuses to
  # update with varying blocks inside a shard_map: hand it varying buffers to write into
  # (aliased inputs that the kernel never sees).
  multi = isinstance(out_shape, (list, tuple))
  outs, ospecs = (list(out_shape), list(out_specs)) if multi else ([out_shape], [out_specs])
  n_in = len(in_specs)

  def buffered_kernel(*refs):
    return kernel(*refs[:n_in], *refs[n_in + len(outs):])

  call = pl.pallas_call(
      buffered_kernel, grid=grid, in_specs=[*in_specs, *ospecs], out_specs=out_specs,
      out_shape=out_shape, interpret=True,
      input_output_aliases={n_in + i: i for i in range(len(outs))})
  return lambda *args: call(*args, *ex.consts([np.zeros(o.shape, o.dtype) for o in outs]))


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
  consts = ex.consts(tile_consts(plan.p, plan.q))
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
  kernel = functools.partial(_single_fwd_kernel, has_gate=gate is not None, dot=ex.dot)
  y = _call(kernel, (c, b), in_specs, row, ex.sds((b, c, ph, q), u.dtype),
            ex)(*ins, *consts)
  return _unhalves(y, plan)


def single_backward(u, gate, dy, k_eff, ex):
  """-> du, dgate [B, C, L] and dk_eff [C, L] float32."""
  plan = ex.plan
  b, c, _ = u.shape
  consts, row, kspec, ph, q = _single_specs(ex)
  shape = (b, c, ph, q)
  kernel = functools.partial(_single_bwd_kernel, dot=ex.dot)
  du, dg, dkb = _call(
      kernel, (c, b), [row, row, row, kspec] + _const_specs(consts), [row] * 3,
      [ex.sds(shape, u.dtype), ex.sds(shape, gate.dtype),
       ex.sds(shape, jnp.float32)], ex,
  )(*(_halves(x, plan, ph) for x in (u, gate, dy, _scaled(k_eff, plan))), *consts)
  return _unhalves(du, plan), _unhalves(dg, plan), _unhalves(dkb, plan).sum(0) / plan.n


def _col_forward(x, pre, ex):
  """x (and pre): [B, C, L] real -> column-transformed (re, im) [B, C, kept, m] float32: the
  first n1/2 + tail of the n1 rows (the rest mirror them)."""
  plan = ex.plan
  b, c, _ = x.shape
  n1, n1h, m, kept = plan.n1, plan.n1 // 2, plan.m, plan.kept
  bm, bk = plan.col_block, plan.tail   # the largest power of two that divides `kept`
  fr, fi = dft(n1)
  twr, twi = twiddle(n1, m)
  consts = ex.consts([fr[:kept, :n1h], fi[:kept, :n1h], twr[:kept], twi[:kept]])
  grid = (c, b, m // bm, kept // bk)
  xspec = pl.BlockSpec((None, None, n1h, bm), lambda ci, bi, j, i: (bi, ci, 0, j))
  gspec = pl.BlockSpec((bk, n1h), lambda ci, bi, j, i: (i, 0))
  tspec = pl.BlockSpec((bk, bm), lambda ci, bi, j, i: (i, j))
  ospec = pl.BlockSpec((None, None, bk, bm), lambda ci, bi, j, i: (bi, ci, i, j))
  ins = [_halves(x, plan, n1h)] + ([_halves(pre, plan, n1h)] if pre is not None else [])
  kernel = functools.partial(_col_fwd_kernel, has_pre=pre is not None, dot=ex.dot)
  out = ex.sds((b, c, kept, m), jnp.float32)
  return _call(kernel, grid, [xspec] * len(ins) + [gspec, gspec, tspec, tspec], [ospec, ospec],
               [out, out], ex)(*ins, *consts)


def _inverse_weights(plan: Plan) -> np.ndarray:
  """[kept]: how often each kept row of a real signal's column spectrum counts in its inverse.
  Row g1 in 1 .. n1/2 - 1 stands for itself and its conjugate mirror n1 - g1 (whose term is the
  conjugate of its own, so Re(both) = 2 Re(its own)); rows 0 and n1/2 are their own mirrors;
  the tail past n1/2 is not used."""
  weights = np.zeros(plan.kept, np.float32)
  weights[:plan.n1 // 2 + 1] = 2.0
  weights[0] = weights[plan.n1 // 2] = 1.0
  return weights


def _col_inverse(cr, ci, post, out_dtype, ex):
  """(re, im) [B, C, kept, m] of a real signal -> Re(inverse column DFT)[:, :, :n1/2] (* post)
  -> [B, C, L]."""
  plan = ex.plan
  b, c = cr.shape[:2]
  n1, n1h, m, tail = plan.n1, plan.n1 // 2, plan.m, plan.tail
  bm, bk = plan.col_block, plan.row_block
  fr, fi = dft(n1)
  twr, twi = twiddle(n1, m)
  weights = _inverse_weights(plan)
  hr, hi = fr[:n1h, :plan.kept] * weights, fi[:n1h, :plan.kept] * weights
  consts = ex.consts([hr[:, :n1h], hi[:, :n1h], hr[:, n1h:], hi[:, n1h:],
                      twr[:n1h], twi[:n1h], twr[n1h:plan.kept], twi[n1h:plan.kept]])
  grid = (c, b, m // bm, n1h // bk)
  # The kept rows as two blocks of the same array: the first n1/2 and the tail.
  cspec = pl.BlockSpec((None, None, n1h, bm), lambda ci, bi, j, i: (bi, ci, 0, j))
  tail_spec = pl.BlockSpec((None, None, tail, bm),
                           lambda ci, bi, j, i: (bi, ci, n1h // tail, j))
  ospec = pl.BlockSpec((None, None, bk, bm), lambda ci, bi, j, i: (bi, ci, i, j))
  hspec = pl.BlockSpec((bk, n1h), lambda ci, bi, j, i: (i, 0))
  htail = pl.BlockSpec((bk, tail), lambda ci, bi, j, i: (i, 0))
  tspec = pl.BlockSpec((n1h, bm), lambda ci, bi, j, i: (0, j))
  ttail = pl.BlockSpec((tail, bm), lambda ci, bi, j, i: (0, j))
  ins = [cr, ci, cr, ci] + ([_halves(post, plan, n1h)] if post is not None else [])
  in_specs = ([cspec, cspec, tail_spec, tail_spec] + ([ospec] if post is not None else [])
              + [hspec, hspec, htail, htail, tspec, tspec, ttail, ttail])
  kernel = functools.partial(_col_inv_kernel, has_post=post is not None, dot=ex.dot)
  y = _call(kernel, grid, in_specs, ospec, ex.sds((b, c, n1h, m), out_dtype),
            ex)(*ins, *consts)
  return _unhalves(y, plan)


def _row_specs(plan):
  p, q = plan.p, plan.q
  row = pl.BlockSpec((None, None, None, p, q), lambda ci, r, bi: (bi, ci, r, 0, 0))
  kspec = pl.BlockSpec((None, None, p, q), lambda ci, r, bi: (ci, r, 0, 0))
  return row, kspec


def _rows(x, plan):
  return x.reshape(*x.shape[:-1], plan.p, plan.q)


def _filter_columns(k_eff, ex):
  """k_eff [C, L] -> (re, im) of the column-transformed k_eff / n as rows [C, kept, p, q]: the
  filter as the row kernels take it (they do its row DFT on-chip). One pass of the signal's
  column kernel (a batch of one) instead of a spectrum from XLA's FFT, whose rfft, conjugate
  half and tile-order transpose moved more bytes than the convolution kernels (issue 24)."""
  plan = ex.plan
  cols = _col_forward(_scaled(k_eff, plan)[None], None, ex)
  return tuple(x.reshape(k_eff.shape[0], plan.kept, plan.p, plan.q) for x in cols)


def two_pass_forward(u, k_eff, gate, ex):
  """u, gate: [B, C, L]; k_eff: [C, L] float32 (the skip term folded in) -> y [B, C, L]."""
  plan = ex.plan
  b, c, _ = u.shape
  spec = _filter_columns(k_eff, ex)
  ar, ai = _col_forward(u, None, ex)
  consts = ex.consts(tile_consts(plan.p, plan.q))
  row, kspec = _row_specs(plan)
  out = ex.sds((b, c, plan.kept, plan.p, plan.q), jnp.float32)
  cr, ci = _call(
      functools.partial(_row_fwd_kernel, dot=ex.dot), (c, plan.kept, b),
      [row, row, kspec, kspec] + _const_specs(consts), [row, row], [out, out], ex,
  )(_rows(ar, plan), _rows(ai, plan), *spec, *consts)
  flat = lambda x: x.reshape(b, c, plan.kept, plan.m)  # noqa: E731
  return _col_inverse(flat(cr), flat(ci), gate, u.dtype, ex)


def two_pass_backward(u, gate, dy, k_eff, ex):
  """-> du, dgate [B, C, L] and dk_eff [C, L] float32."""
  plan = ex.plan
  b, c, _ = u.shape
  spec = _filter_columns(k_eff, ex)
  aur, aui = _col_forward(u, None, ex)
  azr, azi = _col_forward(dy, gate, ex)
  consts = ex.consts(tile_consts(plan.p, plan.q))
  row, kspec = _row_specs(plan)
  out = ex.sds((b, c, plan.kept, plan.p, plan.q), jnp.float32)
  kernel = functools.partial(_row_bwd_kernel, dot=ex.dot)
  outs = _call(
      kernel, (c, plan.kept, b), [row] * 4 + [kspec, kspec] + _const_specs(consts), [row] * 6,
      [out] * 6, ex,
  )(*(_rows(x, plan) for x in (aur, aui, azr, azi)), *spec, *consts)
  flat = [x.reshape(b, c, plan.kept, plan.m) for x in outs]
  dg = _col_inverse(flat[0], flat[1], dy, gate.dtype, ex)
  du = _col_inverse(flat[2], flat[3], None, u.dtype, ex)
  dkb = _col_inverse(flat[4], flat[5], None, jnp.float32, ex)
  return du, dg, dkb.sum(0) / plan.n


# ----------------------------------------------------------------------------------------------
# Public op.
