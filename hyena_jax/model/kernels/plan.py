"""The plan of a Pallas long convolution: FFT size, its factorisation into on-chip [p, q] tiles
and the single- or two-pass scheme, from the sequence length and the backend's block rules
and the DFT matrices of its tiles (`pallas_conv`'s docstring has the maths).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import numpy as np

Platform = Literal["gpu", "tpu"]
HIGHEST = jax.lax.Precision.HIGHEST


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


RULES = {
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

  @property
  def kept(self) -> int:
    """Two pass: rows of the column spectrum computed and stored, n1/2 of n1. The column DFT is
    shifted by half a bin (`odd_dft`), so a real signal's row n1 - 1 - g1 is the conjugate
    mirror of row g1 and no row is its own mirror: the first half stands for all of them."""
    return self.n1 // 2


def _pow2_at_least(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _split(m: int, p_min: int, q_min: int) -> tuple[int, int]:
  """m = p * q with q close to sqrt(m), q >= q_min and p >= p_min (m a power of two)."""
  q = 1 << ((m.bit_length() - 1 + 1) // 2)
  q = max(q_min, min(q, m // p_min))
  return m // q, q


def two_pass_limit(platform: Platform, max_onchip: int | None = None) -> int:
  """The largest FFT the kernels do: n1_max columns of `max_onchip`-point rows (GPU 2^21
  points, so 1M tokens; TPU 2^23, so 4M tokens)."""
  return RULES[platform].n1_max * (max_onchip or RULES[platform].max_onchip)


def make_plan(length: int, platform: Platform = "gpu", max_onchip: int | None = None) -> Plan:
  """Chooses the FFT size and factors for `length` under `platform`'s block rules."""
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  if platform not in RULES:
    raise ValueError(f"platform must be 'gpu' or 'tpu', got {platform!r}")
  r = RULES[platform]
  max_onchip = max_onchip or r.max_onchip
  n = _pow2_at_least(2 * length)
  if n <= max_onchip:
    n = max(n, r.p_min_half * r.q_min)
    p, q = _split(n, r.p_min_half, r.q_min)
    return Plan(length, n, 1, p, q, platform)
  n1 = max(r.n1_min, n // max_onchip)
  m = max(n // n1, r.p_min * r.q_min)
  if n > two_pass_limit(platform, max_onchip):
    raise ValueError(
        f"length {length} needs an FFT of size {n}, beyond the kernels' two-pass limit "
        f"({r.n1_max} x {max_onchip} = {two_pass_limit(platform, max_onchip)} points on "
        f"{platform}); long_conv splits such sequences in halves")
  p, q = _split(m, r.p_min, r.q_min)
  n1h = n1 // 2
  return Plan(length, n1 * m, n1, p, q, platform,
              col_block=min(r.col_block, m), row_block=min(r.row_block, n1h))


# ----------------------------------------------------------------------------------------------
# DFT matrices and twiddles (float64 maths, float32 storage), as (real, imag) numpy pairs.


# ------------------------------------------------------------------------------------------------
# The DFT matrices of a plan's tiles (numpy constants, float64 maths, float32 results)


@functools.lru_cache(maxsize=64)
def dft(n: int) -> tuple[np.ndarray, np.ndarray]:
  """F[j, f] = exp(-2 pi i j f / n): [n, n]; symmetric."""
  jf = np.outer(np.arange(n), np.arange(n)) % n
  angle = -2.0 * np.pi * jf / n
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


@functools.lru_cache(maxsize=64)
def twiddle(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
  """T[f1, j2] = exp(-2 pi i f1 j2 / (rows * cols)): [rows, cols]."""
  n = rows * cols
  angle = -2.0 * np.pi * (np.outer(np.arange(rows), np.arange(cols)) % n) / n
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


@functools.lru_cache(maxsize=64)
def odd_dft(n: int) -> tuple[np.ndarray, np.ndarray]:
  """G[g, j] = exp(-2 pi i j (g + 1/2) / n) for g, j < n/2: [n/2, n/2], the first half of the
  frequencies of the half-bin-shifted DFT acting on the first half of a zero-padded input."""
  return odd_twiddle(n // 2, n // 2, n)   # the same exponent, j (g + 1/2) / n


def odd_twiddle(rows: int, cols: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """T[g, j] = exp(-2 pi i j (g + 1/2) / n): [rows, cols], the twiddles between the columns'
  half-bin-shifted DFT and the rows' plain one in an n-point transform."""
  angle = -np.pi * (np.outer(2 * np.arange(rows) + 1, np.arange(cols)) % (2 * n)) / n
  return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def tile_consts(p: int, q: int) -> tuple[np.ndarray, ...]:
  """Constants of one on-chip [p, q] tile, in the order the kernels unpack them.

  fp: F_p [p, p], fph: F_p[:, :p/2] (forward of a half-filled tile), fhp: F_p[:p/2, :] (inverse
  keeping the first half of the rows), fq: F_q [q, q], tw: twiddles [p, q]. Each as (re, im).
  """
  fpr, fpi = dft(p)
  fqr, fqi = dft(q)
  twr, twi = twiddle(p, q)
  h = p // 2
  return (fpr, fpi, fpr[:, :h].copy(), fpi[:, :h].copy(), fpr[:h].copy(), fpi[:h].copy(),
          fqr, fqi, twr, twi)


# ----------------------------------------------------------------------------------------------
# In-kernel tile maths on values (float32, complex as pairs).

