"""Pallas long convolution: FFTs as matrix multiplications, fused with the skip term and the gate.

Computes exactly what `fftconv.fft_long_conv` computes,

    y[b, c, t] = (sum_{s <= t} k[c, t - s] u[b, c, s] + D[c] u[b, c, t]) * gate[b, c, t],

but with every DFT written as dense matmuls (the four-step / Monarch decomposition FlashFFTConv
uses), so that tensor cores and the TPU MXU do the work instead of XLA's FFT.

The maths, for an FFT of size n = p * q (input index j = j1 q + j2, output index f = f1 + p f2):

    X[f1 + p f2] = sum_j2 F_q[j2, f2] * T[f1, j2] * sum_j1 F_p[f1, j1] x[j1, j2]
    i.e.  X_tile = ((F_p @ x_tile) * T) @ F_q          with T[f1, j2] = exp(-2 pi i f1 j2 / n)

and its inverse conj(F_p) @ ((Y_tile @ conj(F_q)) * conj(T)). Spectra stay in this "tile order";
every product between spectra is pointwise, so the order never needs undoing. Complex numbers are
(real, imag) float32 pairs. n is a power of two >= 2L, so the input occupies the first half of
the tile's rows (half of the first matmul is skipped) and only the first half of the output rows
is ever computed.

Two tricks keep the kernels small:
  * the skip term is folded into the filter, conv(u, k) + D u = conv(u, k + D delta), so
    D never enters a kernel and dD = dk_eff[:, 0];
  * the filter's spectrum (channels only, shared by the batch) is computed outside the kernels
    with the same DFT matrices as XLA einsums (matmuls, no FFT op), scaled by 1/n.

Schemes (see `make_plan`):
  * single pass, n <= `max_onchip` (GPU 4096, TPU 16384): one kernel per (batch, channel) row
    does DFT, spectrum product, inverse DFT and gate on a [p, q] tile that lives on-chip.
  * two pass, larger n (up to 1M tokens and beyond): n = n1 * m with m on-chip; kernel 1 does
    the length-n1 DFTs down the columns of the [n1, m] view (plus twiddles) and writes them to
    HBM, kernel 2 does each row's length-m DFT on-chip as a [p, q] tile, the spectrum product and
    the row's inverse DFT, kernel 3 does the inverse column DFTs, the gate and the output cast.

Backward (`jax.custom_vjp`), with z = dy * gate and s = conv(u, k_eff):
    du = corr(z, k_eff)                (spectrum product with conj(K)),
    dgate = dy * s                     (the forward recomputed, not stored),
    dk_eff = sum_b corr(z_b, u_b)      (product Z conj(U); per-row results are summed over the
                                        batch by XLA, a documented mix: Pallas grids on GPU cannot
                                        accumulate across programs),
    dD = dk_eff[:, 0].
In the single-pass scheme one kernel computes all three from u, gate and dy.

Lowerings: Triton-flavoured Pallas on GPU, Mosaic on TPU, chosen from the devices the program
is compiled for (the mesh in context; without one, `lax.platform_dependent` lets lowering pick),
never from `jax.default_backend()`, so ahead-of-time compiles for an absent TPU or GPU get their
real kernels. On a CPU target the same kernels run through the Pallas interpreter
(`interpret=True` forces it anywhere, for tests). Block shapes follow each backend's rules:
Triton needs power-of-two blocks and matmul dims >= 16; Mosaic needs the last two block dims to
be multiples of (8, 128) or the full array dims. The DFT matmuls run on the matrix units at
float32-level accuracy: multi-pass bf16 (Precision.HIGHEST) on the MXU, three TF32 passes
(DotAlgorithmPreset.TF32_TF32_F32_X3) on tensor cores; see `long_conv(precision=...)`.
Under a multi-device mesh the op wraps itself in a shard_map over the batch axes (XLA cannot
partition Mosaic kernels and would replicate Triton ones); inside a shard_map the outputs carry
the operands' varying mesh axes.
STATUS: compiled deviceless by the real compilers (libtpu for TPU v5e/v5p, XLA:GPU + Triton +
ptxas for H100; see launch/aot_compile.py); never run on TPU or GPU hardware, so speed and
on-device numerics are unmeasured. Interpret mode (CPU tests) checks the maths, with the TF32
operand rounding of the GPU path emulated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

Platform = Literal["gpu", "tpu"]
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Plan: FFT size and its factorisation, from the length and the backend's block rules.

@dataclasses.dataclass(frozen=True)
class _Rules:
  p_min_half: int   # tile rows in the single-pass scheme (half of them hold the input)
  p_min: int        # tile rows of a full complex row tile (two-pass row kernel)
  q_min: int        # tile columns (the lane dimension on TPU)
  max_onchip: int   # largest FFT done on-chip in one kernel
  n1_min: int       # smallest column factor of the two-pass scheme
  n1_max: int       # largest column factor (its DFT matrix is loaded whole per block)
  col_block: int    # columns per program in the column kernels
  row_block: int    # output rows per program in the column kernels


_RULES = {
    # Triton: power-of-two blocks, each matmul dim >= 16; tiles held in registers/shared memory.
    "gpu": _Rules(p_min_half=32, p_min=16, q_min=16, max_onchip=4096, n1_min=32, n1_max=512,
                  col_block=32, row_block=32),
    # Mosaic: last two block dims multiples of (8, 128) (or full); tiles live in VMEM.
    "tpu": _Rules(p_min_half=16, p_min=8, q_min=128, max_onchip=16384, n1_min=16, n1_max=512,
                  col_block=512, row_block=512),
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """How a length-`length` causal convolution is computed.

  n = n1 * p * q is the FFT size (a power of two >= 2 * length). n1 == 1 selects the single-pass
  scheme; otherwise rows of length m = p * q are transformed on-chip and the n1-point DFTs run
  down the columns in separate kernels.
  """
  length: int
  n: int
  n1: int
  p: int
  q: int
  platform: Platform
  col_block: int = 0
  row_block: int = 0

  @property
  def m(self) -> int:
    return self.p * self.q


def _pow2_at_least(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _split(m: int, p_min: int, q_min: int) -> tuple[int, int]:
  """m = p * q with q close to sqrt(m), q >= q_min and p >= p_min (m a power of two)."""
  q = 1 << ((m.bit_length() - 1 + 1) // 2)
  q = max(q_min, min(q, m // p_min))
  return m // q, q


def make_plan(length: int, platform: Platform = "gpu", max_onchip: int | None = None) -> Plan:
  """Chooses the FFT size and factors for `length` under `platform`'s block rules."""
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  if platform not in _RULES:
    raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
  r = _RULES[platform]
  max_onchip = max_onchip or r.max_onchip
  n = _pow2_at_least(2 * length)
  if n <= max_onchip:
    n = max(n, r.p_min_half * r.q_min)
    p, q = _split(n, r.p_min_half, r.q_min)
    return Plan(length, n, 1, p, q, platform)
  n1 = max(r.n1_min, n // max_onchip)
  m = max(n // n1, r.p_min * r.q_min)
  if n1 > r.n1_max:
    raise ValueError(
        f"length {length} needs an FFT of size {n}, beyond this kernel's two-pass limit "
        f"({r.n1_max} x {max_onchip} = {r.n1_max * max_onchip} points on {platform}); "
        "use conv_impl='fft' for such lengths")
  p, q = _split(m, r.p_min, r.q_min)
  n1h = n1 // 2
  return Plan(length, n1 * m, n1, p, q, platform,
              col_block=min(r.col_block, m), row_block=min(r.row_block, n1h))


# ----------------------------------------------------------------------------------------------
# DFT matrices and twiddles (float64 maths, float32 storage), as (real, imag) numpy pairs.

@functools.lru_cache(maxsize=64)
def _dft(n: int) -> tuple[np.ndarray, np.ndarray]:
  """F[j, f] = exp(-2 pi i j f / n): [n, n]; symmetric."""
  jf = np.outer(np.arange(n), np.arange(n)) % n
  angle = -2.0 * np.pi * jf / n
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _twiddle(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
  """T[f1, j2] = exp(-2 pi i f1 j2 / (rows * cols)): [rows, cols]."""
  n = rows * cols
  angle = -2.0 * np.pi * (np.outer(np.arange(rows), np.arange(cols)) % n) / n
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def _tile_consts(p: int, q: int) -> list[np.ndarray]:
  """Constants of one on-chip [p, q] tile, in the order the kernels unpack them.

  fp: F_p [p, p], fph: F_p[:, :p/2] (forward of a half-filled tile), fhp: F_p[:p/2, :] (inverse
  keeping the first half of the rows), fq: F_q [q, q], tw: twiddles [p, q]. Each as (re, im).
  """
  fpr, fpi = _dft(p)
  fqr, fqi = _dft(q)
  twr, twi = _twiddle(p, q)
  h = p // 2
  return [fpr, fpi, fpr[:, :h].copy(), fpi[:, :h].copy(), fpr[:h].copy(), fpi[:h].copy(),
          fqr, fqi, twr, twi]


# ----------------------------------------------------------------------------------------------
# In-kernel tile maths on values (float32, complex as pairs).

def _round_tf32(x):
  """float32 -> nearest TF32 (8 exponent, 10 mantissa bits), as the tensor cores read it."""
  return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=10)


@dataclasses.dataclass(frozen=True)
class _Dot:
  """How the kernels' float32 matmuls run.

  precision: what jnp.dot is given (a Precision or a DotAlgorithmPreset). emulate: in interpret
  mode, round the operands as the target's matrix units would ('tf32': one TF32 pass, 'tf32x3':
  hi/lo TF32 split, three passes, 'bf16': one bfloat16 pass), so that errors measured on CPU are
  the target's (accumulation order is not emulated).
  """
  precision: object
  emulate: str | None = None

  def __call__(self, a, b):
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    if self.emulate is None:
      return dot(a, b, precision=self.precision)
    exact = functools.partial(dot, precision=_HIGHEST)
    if self.emulate == "bf16":
      return exact(a.astype(jnp.bfloat16).astype(jnp.float32),
                   b.astype(jnp.bfloat16).astype(jnp.float32))
    a_hi, b_hi = _round_tf32(a), _round_tf32(b)
    if self.emulate == "tf32":
      return exact(a_hi, b_hi)
    # tf32x3 (Triton's TF32x3): a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi.
    a_lo, b_lo = _round_tf32(a - a_hi), _round_tf32(b - b_hi)
    return exact(a_hi, b_hi) + (exact(a_hi, b_lo) + exact(a_lo, b_hi))


def _mm(a, b, dot: _Dot):
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
  """y = IDFT(DFT(u) K)[:n/2] * gate on one [p/2, q] half tile."""
  u_ref, kr_ref, ki_ref = refs[:3]
  gate_ref = refs[3] if has_gate else None
  consts = refs[3 + has_gate:-1]
  (y_ref,) = refs[-1:]
  tile = _Tile(consts, dot)
  ur, ui = tile.forward_real_half(u_ref[...].astype(jnp.float32))
  y = tile.inverse_real_half(*_cmul(ur, ui, kr_ref[...], ki_ref[...]))
  if has_gate:
    y = y * gate_ref[...].astype(jnp.float32)
  y_ref[...] = y.astype(y_ref.dtype)


def _single_bwd_kernel(u_ref, g_ref, dy_ref, kr_ref, ki_ref, *refs, dot):
  """du = corr(dy g, k), dg = dy conv(u, k), dkb = corr(dy g, u) for one (batch, channel) row."""
  consts, (du_ref, dg_ref, dkb_ref) = refs[:-3], refs[-3:]
  tile = _Tile(consts, dot)
  u = u_ref[...].astype(jnp.float32)
  dy = dy_ref[...].astype(jnp.float32)
  ur, ui = tile.forward_real_half(u)
  zr, zi = tile.forward_real_half(dy * g_ref[...].astype(jnp.float32))
  kr, ki = kr_ref[...], ki_ref[...]
  s = tile.inverse_real_half(*_cmul(ur, ui, kr, ki))
  dg_ref[...] = (dy * s).astype(dg_ref.dtype)
  du_ref[...] = tile.inverse_real_half(*_cmul_conj(zr, zi, kr, ki)).astype(du_ref.dtype)
  # Unscaled (x n): the 1/n is applied after the batch sum, outside (a scalar literal inside a
  # kernel breaks the interpreter under shard_map's check_vma).
  dkb_ref[...] = tile.inverse_real_half(*_cmul_conj(zr, zi, ur, ui))


def _col_fwd_kernel(*refs, has_pre, dot):
  """A[rows, cols] = T * (F_n1[rows, :n1/2] @ x[:n1/2, cols]) for x = u (or u * pre)."""
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
  """One row of the column-transformed signal: row IDFT(row DFT(a) * K), complex [p, q]."""
  consts, (cr_ref, ci_ref) = refs[:-2], refs[-2:]
  tile = _Tile(consts, dot)
  xr, xi = tile.forward(ar_ref[...], ai_ref[...])
  cr_ref[...], ci_ref[...] = tile.inverse(*_cmul(xr, xi, kr_ref[...], ki_ref[...]))


def _row_bwd_kernel(aur_ref, aui_ref, azr_ref, azi_ref, kr_ref, ki_ref, *refs, dot):
  """Row-pass of the backward: U K (for dgate), Z conj(K) (for du), Z conj(U) (for dk, times n)."""
  consts, outs = refs[:-6], refs[-6:]
  tile = _Tile(consts, dot)
  ur, ui = tile.forward(aur_ref[...], aui_ref[...])
  zr, zi = tile.forward(azr_ref[...], azi_ref[...])
  kr, ki = kr_ref[...], ki_ref[...]
  wr, wi = _cmul_conj(zr, zi, ur, ui)
  # The dk product is left unscaled (x n), as in _single_bwd_kernel.
  products = (_cmul(ur, ui, kr, ki), _cmul_conj(zr, zi, kr, ki), (wr, wi))
  for i, spec in enumerate(products):
    outs[2 * i][...], outs[2 * i + 1][...] = tile.inverse(*spec)


def _col_inv_kernel(*refs, has_post, dot):
  """y[rows, cols] = Re(conj(F_n1)[rows, :] @ (conj(T) * C[:, cols])) (* post)."""
  cr_ref, ci_ref = refs[:2]
  post_ref = refs[2] if has_post else None
  hr_ref, hi_ref, twr_ref, twi_ref, y_ref = refs[2 + has_post:]
  cr, ci = _cmul_conj(cr_ref[...], ci_ref[...], twr_ref[...], twi_ref[...])
  y = _mm(hr_ref[...], cr, dot) + _mm(hi_ref[...], ci, dot)
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
  if not (interpret and ex.vma):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=interpret, compiler_params=_compiler_params(plan.platform, interpret, len(grid)),
    )
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


def _single_forward(u, spec, gate, ex):
  plan = ex.plan
  b, c, _ = u.shape
  ph, q = plan.p // 2, plan.q
  consts = ex.consts(_tile_consts(plan.p, plan.q))
  row = pl.BlockSpec((None, None, ph, q), lambda ci, bi: (bi, ci, 0, 0))
  kspec = pl.BlockSpec((None, plan.p, q), lambda ci, bi: (ci, 0, 0))
  ins = [_halves(u, plan, ph), *spec] + ([_halves(gate, plan, ph)] if gate is not None else [])
  in_specs = [row, kspec, kspec] + ([row] if gate is not None else []) + _const_specs(consts)
  kernel = functools.partial(_single_fwd_kernel, has_gate=gate is not None, dot=ex.dot)
  y = _call(kernel, (c, b), in_specs, row, ex.sds((b, c, ph, q), u.dtype),
            ex)(*ins, *consts)
  return _unhalves(y, plan)


def _single_backward(u, gate, dy, spec, ex):
  plan = ex.plan
  b, c, _ = u.shape
  ph, q = plan.p // 2, plan.q
  consts = ex.consts(_tile_consts(plan.p, plan.q))
  row = pl.BlockSpec((None, None, ph, q), lambda ci, bi: (bi, ci, 0, 0))
  kspec = pl.BlockSpec((None, plan.p, q), lambda ci, bi: (ci, 0, 0))
  shape = (b, c, ph, q)
  kernel = functools.partial(_single_bwd_kernel, dot=ex.dot)
  du, dg, dkb = _call(
      kernel, (c, b), [row, row, row, kspec, kspec] + _const_specs(consts), [row] * 3,
      [ex.sds(shape, u.dtype), ex.sds(shape, gate.dtype),
       ex.sds(shape, jnp.float32)], ex,
  )(*(_halves(x, plan, ph) for x in (u, gate, dy)), *spec, *consts)
  return _unhalves(du, plan), _unhalves(dg, plan), _unhalves(dkb, plan).sum(0) / plan.n


def _col_forward(x, pre, ex):
  """x (and pre): [B, C, L] real -> column-transformed (re, im) [B, C, n1, m] float32."""
  plan = ex.plan
  b, c, _ = x.shape
  n1, n1h, m = plan.n1, plan.n1 // 2, plan.m
  bm, bk = plan.col_block, plan.row_block
  fr, fi = _dft(n1)
  twr, twi = _twiddle(n1, m)
  consts = ex.consts([fr[:, :n1h], fi[:, :n1h], twr, twi])
  grid = (c, b, m // bm, n1 // bk)
  xspec = pl.BlockSpec((None, None, n1h, bm), lambda ci, bi, j, i: (bi, ci, 0, j))
  gspec = pl.BlockSpec((bk, n1h), lambda ci, bi, j, i: (i, 0))
  tspec = pl.BlockSpec((bk, bm), lambda ci, bi, j, i: (i, j))
  ospec = pl.BlockSpec((None, None, bk, bm), lambda ci, bi, j, i: (bi, ci, i, j))
  ins = [_halves(x, plan, n1h)] + ([_halves(pre, plan, n1h)] if pre is not None else [])
  kernel = functools.partial(_col_fwd_kernel, has_pre=pre is not None, dot=ex.dot)
  out = ex.sds((b, c, n1, m), jnp.float32)
  return _call(kernel, grid, [xspec] * len(ins) + [gspec, gspec, tspec, tspec], [ospec, ospec],
               [out, out], ex)(*ins, *consts)


def _col_inverse(cr, ci, post, out_dtype, ex):
  """(re, im) [B, C, n1, m] -> Re(inverse column DFT)[:, :, :n1/2] (* post) -> [B, C, L]."""
  plan = ex.plan
  b, c = cr.shape[:2]
  n1, n1h, m = plan.n1, plan.n1 // 2, plan.m
  bm, bk = plan.col_block, plan.row_block
  fr, fi = _dft(n1)
  twr, twi = _twiddle(n1, m)
  consts = ex.consts([fr[:n1h], fi[:n1h], twr, twi])
  grid = (c, b, m // bm, n1h // bk)
  cspec = pl.BlockSpec((None, None, n1, bm), lambda ci, bi, j, i: (bi, ci, 0, j))
  ospec = pl.BlockSpec((None, None, bk, bm), lambda ci, bi, j, i: (bi, ci, i, j))
  hspec = pl.BlockSpec((bk, n1), lambda ci, bi, j, i: (i, 0))
  tspec = pl.BlockSpec((n1, bm), lambda ci, bi, j, i: (0, j))
  ins = [cr, ci] + ([_halves(post, plan, n1h)] if post is not None else [])
  in_specs = [cspec, cspec] + ([ospec] if post is not None else []) + [hspec, hspec, tspec, tspec]
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


def _two_pass_forward(u, spec, gate, ex):
  plan = ex.plan
  b, c, _ = u.shape
  ar, ai = _col_forward(u, None, ex)
  consts = ex.consts(_tile_consts(plan.p, plan.q))
  row, kspec = _row_specs(plan)
  out = ex.sds((b, c, plan.n1, plan.p, plan.q), jnp.float32)
  cr, ci = _call(
      functools.partial(_row_fwd_kernel, dot=ex.dot), (c, plan.n1, b),
      [row, row, kspec, kspec] + _const_specs(consts), [row, row], [out, out], ex,
  )(_rows(ar, plan), _rows(ai, plan), *spec, *consts)
  flat = lambda x: x.reshape(b, c, plan.n1, plan.m)  # noqa: E731
  return _col_inverse(flat(cr), flat(ci), gate, u.dtype, ex)


def _two_pass_backward(u, gate, dy, spec, ex):
  plan = ex.plan
  b, c, _ = u.shape
  aur, aui = _col_forward(u, None, ex)
  azr, azi = _col_forward(dy, gate, ex)
  consts = ex.consts(_tile_consts(plan.p, plan.q))
  row, kspec = _row_specs(plan)
  out = ex.sds((b, c, plan.n1, plan.p, plan.q), jnp.float32)
  kernel = functools.partial(_row_bwd_kernel, dot=ex.dot)
  outs = _call(
      kernel, (c, plan.n1, b), [row] * 4 + [kspec, kspec] + _const_specs(consts), [row] * 6,
      [out] * 6, ex,
  )(*(_rows(x, plan) for x in (aur, aui, azr, azi)), *spec, *consts)
  flat = [x.reshape(b, c, plan.n1, plan.m) for x in outs]
  dg = _col_inverse(flat[0], flat[1], dy, gate.dtype, ex)
  du = _col_inverse(flat[2], flat[3], None, u.dtype, ex)
  dkb = _col_inverse(flat[4], flat[5], None, jnp.float32, ex)
  return du, dg, dkb.sum(0) / plan.n


# ----------------------------------------------------------------------------------------------
# The filter's spectrum, in tile order, as XLA matmuls (channels only: shared by the batch).

def filter_spectrum(k_eff: jax.Array, plan: Plan) -> tuple[jax.Array, jax.Array]:
  """k_eff: [C, L] float32 -> DFT_n(k_eff) / n in the kernels' tile order, (re, im).

  Single pass: [C, p, q] with entry [f1, f2] = X[f1 + p f2]. Two pass: [C, n1, p, q] with entry
  [f1, g1, g2] = X[f1 + n1 (g1 + p g2)].
  """
  ein = functools.partial(jnp.einsum, precision=_HIGHEST)
  c = k_eff.shape[0]

  def col_step(xr, xi, p, q, half):
    """T * (F_p @ x) over the last two axes [..., p or p/2, q] (xi None: real input)."""
    fr, fi = (np.ascontiguousarray(a[:, :p // 2]) if half else a for a in _dft(p))
    ar = ein("fj,...jq->...fq", fr, xr)
    ai = ein("fj,...jq->...fq", fi, xr)
    if xi is not None:
      ar, ai = ar - ein("fj,...jq->...fq", fi, xi), ai + ein("fj,...jq->...fq", fr, xi)
    return _cmul(ar, ai, *_twiddle(p, q))

  def tile_dft(xr, xi, p, q, half):
    """Four-step DFT over the last two axes: (T * (F_p @ x)) @ F_q."""
    ar, ai = col_step(xr, xi, p, q, half)
    gr, gi = _dft(q)
    return (ein("...fj,jg->...fg", ar, gr) - ein("...fj,jg->...fg", ai, gi),
            ein("...fj,jg->...fg", ar, gi) + ein("...fj,jg->...fg", ai, gr))

  rows = plan.p // 2 if plan.n1 == 1 else plan.n1 // 2
  x = _halves(k_eff.astype(jnp.float32)[None], plan, rows)[0]       # [C, rows, n / (2 rows)]
  if plan.n1 == 1:
    xr, xi = tile_dft(x, None, plan.p, plan.q, half=True)
  else:
    ar, ai = col_step(x, None, plan.n1, plan.m, half=True)          # [C, n1, m]: columns + twiddle
    split = lambda a: a.reshape(c, plan.n1, plan.p, plan.q)           # noqa: E731
    xr, xi = tile_dft(split(ar), split(ai), plan.p, plan.q, half=False)
  return xr / plan.n, xi / plan.n


# ----------------------------------------------------------------------------------------------
# Public op.

PrecisionName = Literal["highest", "default", "float32"]

# What the kernels' matmuls run as, compiled, per (block rules, precision).
_COMPILED_DOTS = {
    # MXU: HIGHEST is the multi-pass bf16 product (float32 accuracy), DEFAULT one bf16 pass.
    ("tpu", "highest"): _Dot(_HIGHEST),
    ("tpu", "default"): _Dot(jax.lax.Precision.DEFAULT),
    ("tpu", "float32"): _Dot(_HIGHEST),
    # Tensor cores: three TF32 passes (hi*hi + hi*lo + lo*hi) keep ~22 mantissa bits; one TF32
    # pass keeps 10. IEEE float32 ("float32") uses no tensor cores: Triton unrolls it into FMA
    # code that ptxas does not finish compiling at L = 131k (issue 17), so it is for tests only.
    ("gpu", "highest"): _Dot(jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3),
    ("gpu", "default"): _Dot(jax.lax.DotAlgorithmPreset.TF32_TF32_F32),
    ("gpu", "float32"): _Dot(_HIGHEST),
}
# The operand rounding interpret mode emulates for the same requests (see _Dot).
_EMULATED = {("gpu", "highest"): "tf32x3", ("gpu", "default"): "tf32", ("tpu", "default"): "bf16"}


def _dot_for(platform: Platform, precision: str, interpret: bool) -> _Dot:
  if interpret:
    return _Dot(_HIGHEST, _EMULATED.get((platform, precision)))
  return _COMPILED_DOTS[platform, precision]


@dataclasses.dataclass(frozen=True)
class _Exec:
  """Everything static about one call: plan, interpret or compile, matmul numerics, and the
  mesh axes the operands vary over inside a shard_map (the outputs vary over the same)."""
  plan: Plan
  interpret: bool
  dot: _Dot
  vma: frozenset = frozenset()

  def sds(self, shape, dtype) -> jax.ShapeDtypeStruct:
    mat = jax.sharding.ManualAxisType(varying=self.vma) if self.vma else None
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)

  def consts(self, arrays) -> list[jax.Array]:
    """numpy constants as operands that vary like the others (the interpreter adds them to
    varying blocks, which check_vma refuses for unvarying ones)."""
    return [_varying(jnp.asarray(a), self.vma) for a in arrays]


# Two-pass intermediates are float32 complex signals of the FFT size (16 MiB per channel and
# sequence at 1M tokens; the backward holds ten of them): channels are processed in groups
# holding at most this many bytes per such signal, so that the kernel needs no more memory than
# XLA's FFT path.
_GROUP_BYTES = 2 ** 29


def _channel_groups(plan: Plan, batch: int, channels: int) -> int:
  if plan.n1 == 1:
    return 1
  per_group = max(1, _GROUP_BYTES // (batch * plan.n * 8))
  while channels % per_group:
    per_group -= 1
  return channels // per_group


def _by_channel_groups(fn, groups, args, axes, out_axes):
  """fn over `groups` slices of the channel axis (`axes[i]` of args[i]), one after another
  (lax.map), outputs concatenated back along `out_axes`."""
  if groups == 1:
    return fn(*args)

  def split(x, a):
    if x is None:
      return None
    x = x.reshape(x.shape[:a] + (groups, x.shape[a] // groups) + x.shape[a + 1:])
    return jnp.moveaxis(x, a, 0)

  def merge(y, a):
    y = jnp.moveaxis(y, 0, a)
    return y.reshape(y.shape[:a] + (-1,) + y.shape[a + 2:])

  outs = jax.lax.map(lambda xs: fn(*xs), tuple(split(x, a) for x, a in zip(args, axes)))
  if isinstance(outs, tuple):
    return tuple(merge(y, a) for y, a in zip(outs, out_axes))
  return merge(outs, out_axes[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(u, k_eff, gate, ex):
  def one(u, k_eff, gate):
    fwd = _single_forward if ex.plan.n1 == 1 else _two_pass_forward
    return fwd(u, filter_spectrum(k_eff, ex.plan), gate, ex)
  groups = _channel_groups(ex.plan, u.shape[0], u.shape[1])
  return _by_channel_groups(one, groups, (u, k_eff, gate), (1, 0, 1), (1,))


def _conv_fwd(u, k_eff, gate, ex):
  return _conv(u, k_eff, gate, ex), (u, k_eff, gate)


def _conv_bwd(ex, residuals, dy):
  u, k_eff, gate = residuals
  g = jnp.ones_like(u) if gate is None else gate

  def one(u, k_eff, g, dy):
    bwd = _single_backward if ex.plan.n1 == 1 else _two_pass_backward
    return bwd(u, g, dy, filter_spectrum(k_eff, ex.plan), ex)
  groups = _channel_groups(ex.plan, u.shape[0], u.shape[1])
  du, dg, dk = _by_channel_groups(one, groups, (u, k_eff, g, dy), (1, 0, 1, 1), (1, 1, 0))
  return du, dk.astype(k_eff.dtype), None if gate is None else dg


_conv.defvjp(_conv_fwd, _conv_bwd)


# Device platform names -> block rules ('cpu': the interpreter).
_TARGETS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}


def target_platform() -> str | None:
  """'tpu', 'gpu' or 'cpu': the devices of the mesh in context (`jax.set_mesh`, or the mesh of an
  enclosing `jax.shard_map`); None when there is none. Never `jax.default_backend()`: a program
  compiled ahead of time for a TPU or GPU topology is traced on a CPU host."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return None if device is None else _TARGETS.get(device.platform)


def _varying(x, vma: frozenset):
  missing = tuple(sorted(vma - jax.typeof(x).mat.varying))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _device_conv(u, k_eff, gate, *, interpret, platform, max_onchip, precision):
  """The convolution on each device's own operands (inside a shard_map, or unsharded)."""
  operands = [x for x in (u, k_eff, gate) if x is not None]
  vma = frozenset().union(*(jax.typeof(x).mat.varying for x in operands))
  # Inside a shard_map the kernel's outputs vary over every axis an operand varies over; the
  # filter is made varying too, so its cotangent is summed over those axes by the transpose.
  u, k_eff = _varying(u, vma), _varying(k_eff, vma)
  gate = None if gate is None else _varying(gate, vma)
  length = u.shape[-1]

  def rules(target):
    return platform or ("tpu" if target == "tpu" else "gpu")

  def run(target, u, k_eff, gate):
    interp = target == "cpu" if interpret is None else interpret
    plan = make_plan(length, rules(target), max_onchip)
    return _conv(u, k_eff, gate, _Exec(plan, interp, _dot_for(plan.platform, precision, interp),
                                       vma))

  target = "cpu" if interpret else target_platform()
  if target is not None:
    return run(target, u, k_eff, gate)
  # No mesh says where this runs: trace a branch per platform, and let lowering (which knows
  # the target) keep one. Platforms whose block rules cannot take this length get no branch.
  branches, errors = {}, []
  for name in ("cpu", "tpu", "cuda", "rocm"):
    try:
      make_plan(length, rules(_TARGETS[name]), max_onchip)
    except ValueError as e:
      errors.append(e)
      continue
    branches[name] = functools.partial(run, _TARGETS[name])
  if not branches:
    raise errors[0]
  return jax.lax.platform_dependent(u, k_eff, gate, **branches)


def _batch_shard_map(fn, u, k_eff, gate, batch_axes):
  """Runs `fn` under a shard_map over all the context mesh's non-manual axes, batch split over
  `batch_axes` (those whose sizes divide the batch), everything else replicated.

  Mosaic kernels cannot be partitioned by XLA, and Triton ones would be all-gathered (every
  device computing the whole batch), so a mesh in context always gets an explicit shard_map.
  """
  mesh = jax.sharding.get_abstract_mesh()
  # Every non-manual axis becomes manual, size-1 ones included: Mosaic refuses a region with
  # any axis left to the partitioner.
  free = () if mesh.empty else tuple(
      a for a, t in zip(mesh.axis_names, mesh.axis_types) if t != jax.sharding.AxisType.Manual)
  if math.prod(mesh.shape[a] for a in free) == 1:
    return fn(u, k_eff, gate)
  split, size = [], 1
  for a in batch_axes:
    if a in free and u.shape[0] % (size * mesh.shape[a]) == 0:
      split.append(a)
      size *= mesh.shape[a]
  spec = P(tuple(split)) if split else P()
  if gate is None:
    return jax.shard_map(lambda u, k: fn(u, k, None), mesh=mesh, in_specs=(spec, P()),
                         out_specs=spec, axis_names=set(free))(u, k_eff)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, P(), spec), out_specs=spec,
                       axis_names=set(free))(u, k_eff, gate)


def long_conv(u: jax.Array, k: jax.Array, d_bias: jax.Array, gate: jax.Array | None = None, *,
              interpret: bool | None = None, platform: Platform | None = None,
              max_onchip: int | None = None, precision: PrecisionName = "highest",
              batch_axes: tuple[str, ...] = ("data", "fsdp")) -> jax.Array:
  """Gated causal long convolution, `(causal_conv(u, k) + d_bias[:, None] * u) * gate`.

  Same semantics as `fftconv.fft_long_conv`; differentiable in u, k, d_bias and gate; works
  under jit, vmap and inside `jax.shard_map` (context parallelism calls it per device).

  Where it runs comes from the devices the program is compiled for, never from
  `jax.default_backend()`: the mesh in context (`jax.set_mesh(mesh)`, or an enclosing
  shard_map) names them; without one, a branch per platform is traced and lowering keeps the
  target's (Mosaic on TPU, Triton on CUDA/ROCm, the Pallas interpreter on CPU, where there is
  no Pallas compiler). Under a mesh with non-manual axes of size > 1 the op wraps itself in a
  shard_map that splits the batch over `batch_axes` (Mosaic kernels cannot be partitioned by
  XLA); callers that jit over a multi-device mesh must trace under `jax.set_mesh(mesh)`.

  Args:
    u: [batch, channels, length] float32 or bfloat16.
    k: [channels, length] filter (computed in float32).
    d_bias: [channels] skip term D.
    gate: optional [batch, channels, length] multiplier.
    interpret: True runs the Pallas interpreter (tests), False always compiles; None interprets
      only when the target is the CPU.
    platform: block rules (and lowering) to use, 'gpu' (Triton) or 'tpu' (Mosaic); None takes
      them from the target ('gpu' rules on the CPU). Tests use it to run both in interpret mode.
    max_onchip: largest FFT done in one kernel (default: the platform's); smaller values force
      the two-pass scheme (tests use it at small lengths).
    precision: numerics of the DFT matmuls. 'highest' (default) keeps float32-level accuracy on
      the matrix units: multi-pass bf16 on the TPU MXU, three TF32 passes on tensor cores.
      'default': one bf16 / TF32 pass (about 1e-3 relative error). 'float32': IEEE float32
      (on GPU without tensor cores; Triton/ptxas compile times explode at long lengths). In
      interpret mode the TF32 / bf16 operand rounding of the target is emulated.
    batch_axes: mesh axes the batch is split over when the op shards itself.

  Returns:
    [batch, channels, length] in u's dtype; all DFT arithmetic is float32.
  """
  if u.ndim != 3 or k.ndim != 2 or u.shape[1:] != k.shape:
    raise ValueError(f"long_conv expects u [B, C, L] and k [C, L]; got {u.shape}, {k.shape}")
  if d_bias.shape != (u.shape[1],):
    raise ValueError(f"d_bias must be [channels] = ({u.shape[1]},), got {d_bias.shape}")
  if gate is not None and gate.shape != u.shape:
    raise ValueError(f"gate must have u's shape {u.shape}, got {gate.shape}")
  if not jnp.issubdtype(u.dtype, jnp.floating):
    raise TypeError(f"u must be a float array (float32 or bfloat16), got {u.dtype}")
  if precision not in ("highest", "default", "float32"):
    raise ValueError(f"precision must be 'highest', 'default' or 'float32', got {precision!r}")
  if platform is not None and platform not in _RULES:
    raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
  make_plan(u.shape[-1], platform or "tpu", max_onchip)  # a length no platform takes fails here
  # conv(u, k) + D u == conv(u, k + D delta): D joins the filter's first tap.
  k_eff = k.astype(jnp.float32).at[:, 0].add(d_bias.astype(jnp.float32))
  fn = functools.partial(_device_conv, interpret=interpret, platform=platform,
                         max_onchip=max_onchip, precision=precision)
  return _batch_shard_map(fn, u, k_eff, gate, batch_axes)
