"""The Pallas kernels of the long convolution (bodies only; pallas_calls.py calls them): DFTs as
matmuls on [p, q] tiles (single pass), or column / row / inverse-column passes through HBM (two
pass), forward and backward (`pallas_conv`'s docstring has the maths). The filter enters as
k_eff / n: a real half tile (single pass) or its column transform (two pass, by the signal's own
column kernel); its tile DFT is done on-chip beside the signal's.
"""

from __future__ import annotations

import jax.numpy as jnp

from hyena_jax.model.kernels.matmul import Dot


def _mm(a, b, dot: Dot):
  return dot(a, b)


def _load(ref):
  """A stored spectrum block as float32 (its storage may be bfloat16: `pallas_conv`'s
  `spectra_dtype`); all arithmetic is float32."""
  return ref[...].astype(jnp.float32)


def _store(ref_pair, values):
  for ref, value in zip(ref_pair, values, strict=True):
    ref[...] = value.astype(ref.dtype)


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


def single_fwd_kernel(*refs, has_gate, dot):
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


def single_bwd_kernel(u_ref, g_ref, dy_ref, k_ref, *refs, dot):
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


def col_fwd_kernel(*refs, has_pre, dot):
  """A[rows, cols] = T * (G[rows, :] @ x[:n1/2, cols]) for x = u (or u * pre), rows among the
  kept ones (G: the half-bin-shifted column DFT, `plan.odd_dft`)."""
  x_ref = refs[0]
  pre_ref = refs[1] if has_pre else None
  gr_ref, gi_ref, twr_ref, twi_ref, ar_ref, ai_ref = refs[1 + has_pre:]
  x = x_ref[...].astype(jnp.float32)
  if has_pre:
    x = x * pre_ref[...].astype(jnp.float32)
  ar = _mm(gr_ref[...], x, dot)
  ai = _mm(gi_ref[...], x, dot)
  _store((ar_ref, ai_ref), _cmul(ar, ai, twr_ref[...], twi_ref[...]))


def row_fwd_kernel(ar_ref, ai_ref, kr_ref, ki_ref, *refs, dot):
  """One row of the column-transformed signal a and filter: row IDFT(row DFT(a) row DFT(k)),
  complex [p, q]."""
  consts, (cr_ref, ci_ref) = refs[:-2], refs[-2:]
  tile = _Tile(consts, dot)
  xr, xi = tile.forward(_load(ar_ref), _load(ai_ref))
  kr, ki = tile.forward(_load(kr_ref), _load(ki_ref))
  _store((cr_ref, ci_ref), tile.inverse(*_cmul(xr, xi, kr, ki)))


def row_bwd_kernel(aur_ref, aui_ref, azr_ref, azi_ref, kr_ref, ki_ref, *refs, dot):
  """Row-pass of the backward: U K (for dgate), Z conj(K) (for du), Z conj(U) (for dk, times n)."""
  consts, outs = refs[:-6], refs[-6:]
  tile = _Tile(consts, dot)
  ur, ui = tile.forward(_load(aur_ref), _load(aui_ref))
  zr, zi = tile.forward(_load(azr_ref), _load(azi_ref))
  kr, ki = tile.forward(_load(kr_ref), _load(ki_ref))
  wr, wi = _cmul_conj(zr, zi, ur, ui)
  # The dk product is left unscaled (x n), as in _single_bwd_kernel.
  products = (_cmul(ur, ui, kr, ki), _cmul_conj(zr, zi, kr, ki), (wr, wi))
  for i, spec in enumerate(products):
    _store(outs[2 * i:2 * i + 2], tile.inverse(*spec))


def col_inv_kernel(*refs, has_post, dot):
  """y[rows, cols] = Re(H[rows, :] @ (conj(T) * C[:, cols])) (* post) over the kept rows of C:
  H = 2 conj(G)^T, the inverse of the half-bin-shifted column DFT with each kept row standing
  for its conjugate mirror too (`pallas_calls._col_inverse_consts`)."""
  cr_ref, ci_ref = refs[:2]
  post_ref = refs[2] if has_post else None
  hr_ref, hi_ref, twr_ref, twi_ref, y_ref = refs[2 + has_post:]
  cr, ci = _cmul_conj(_load(cr_ref), _load(ci_ref), twr_ref[...], twi_ref[...])
  y = _mm(hr_ref[...], cr, dot) - _mm(hi_ref[...], ci, dot)
  if has_post:
    y = y * post_ref[...].astype(jnp.float32)
  y_ref[...] = y.astype(y_ref.dtype)
