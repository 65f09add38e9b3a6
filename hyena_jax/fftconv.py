"""Causal long convolution: the only place the convolution maths lives.

    y[b, c, t] = (sum_{s <= t} k[c, t - s] * u[b, c, s] + D[c] * u[b, c, t]) * gate[b, c, t]

`fft_long_conv` is the reference path (`jnp.fft`, float32). The official model uses an FFT of
length exactly 2L; any length >= 2L - 1 gives the same causal convolution, and we use the next
5-smooth length because 2L can have a large prime factor (L = 1,000,002 gives 2 * 1,000,002 =
2^2 * 3 * 166,667, for which FFT libraries fall back to a much slower algorithm).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def fft_size(n_min: int) -> int:
  """Smallest 2^a * 3^b * 5^c >= n_min."""
  if n_min < 1:
    raise ValueError(f"fft_size needs n_min >= 1, got {n_min}")
  best = 1 << (n_min - 1).bit_length()  # a power of two always qualifies
  p5 = 1
  while p5 < best:
    p35 = p5
    while p35 < best:
      p = p35
      while p < n_min:
        p *= 2
      best = min(best, p)
      p35 *= 3
    p5 *= 5
  return best


def fft_long_conv(u: jax.Array, k: jax.Array, d_bias: jax.Array,
                  gate: jax.Array | None = None) -> jax.Array:
  """Causal convolution of each channel with its own filter, plus skip term and optional gate.

  Args:
    u: [batch, channels, length] input (any float dtype).
    k: [channels, length] filter; taps beyond `length` are never needed.
    d_bias: [channels] skip ("D") term.
    gate: optional [batch, channels, length] multiplier applied after the skip term.

  Returns:
    [batch, channels, length] in u's dtype. The FFT and products run in float32.
  """
  if u.ndim != 3 or k.ndim != 2 or u.shape[1:] != k.shape:
    raise ValueError(f"fft_long_conv expects u [B, C, L] and k [C, L]; got {u.shape}, {k.shape}")
  length = u.shape[-1]
  n = fft_size(2 * length - 1)
  u32 = u.astype(jnp.float32)
  k_f = jnp.fft.rfft(k.astype(jnp.float32), n=n)
  u_f = jnp.fft.rfft(u32, n=n)
  y = jnp.fft.irfft(u_f * k_f, n=n)[..., :length]
  y = y + u32 * d_bias.astype(jnp.float32)[:, None]
  if gate is not None:
    y = y * gate.astype(jnp.float32)
  return y.astype(u.dtype)


def direct_long_conv(u: jax.Array, k: jax.Array, d_bias: jax.Array,
                     gate: jax.Array | None = None) -> jax.Array:
  """Quadratic-time reference for tests: the same maths as `fft_long_conv` without FFTs."""
  length = u.shape[-1]
  idx = jnp.arange(length)
  lag = idx[:, None] - idx[None, :]                                     # [t, s]
  toeplitz = jnp.where(lag >= 0, k[:, jnp.clip(lag, 0, length - 1)], 0.0)  # [C, t, s]
  y = jnp.einsum("cts,bcs->bct", toeplitz, u, precision="highest") + u * d_bias[:, None]
  return y if gate is None else y * gate
