"""Causal long convolution: the only place the convolution maths lives.

    y[b, c, t] = (sum_{s <= t} k[c, t - s] * u[b, c, s] + D[c] * u[b, c, t]) * gate[b, c, t]

Entry points, one per way the model needs it:
  * `long_conv(..., impl=conv_impl)`: THE dispatch every whole-sequence caller goes through (the
    model's forward, context parallelism on its channel shard, the decoder's prefill):
    "fft" -> `fft_long_conv`, "pallas" -> `pallas_conv.long_conv` (matmul DFTs, fused gate).
  * `fft_long_conv`: the XLA path (`jnp.fft`, float32; a custom VJP whose FFTs run on CPU as
    one channel group per core, see `_cpu_parts`).
  * `decoding_filter` + `long_conv_step`: one output position on a cache of past inputs, for
    cached decoding. It is a dot product of length T, not a convolution over the sequence, so it
    is the same for every `conv_impl` (an FFT or a Pallas kernel would compute all T outputs to
    keep one).
  * `direct_long_conv`: quadratic-time reference for tests only.

FFT size: the official model uses an FFT of length exactly 2L; any length >= 2L - 1 gives the
same causal convolution, and we use the next 5-smooth length because 2L can have a large prime
factor (L = 1,000,002 gives 2 * 1,000,002 = 2^2 * 3 * 166,667, for which FFT libraries fall back
to a much slower algorithm).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp

from hyena_jax.errors import InputError
from hyena_jax.model.config import CONV_IMPLS


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


def _cpu_parts(channels: int) -> int:
  """How many channel groups the CPU runs as separate FFTs: XLA:CPU runs one FFT on one thread
  below ~32k points but runs independent FFTs concurrently, so one group per core (of at least
  16 channels, DUCC vectorises across channels) keeps every core busy."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(cores or 1, channels // 16))


def _by_channels(fn: Callable[..., tuple], args: tuple, channel_axes: tuple, channels: int
                 ) -> tuple:
  """fn(*args), run on CPU as `_cpu_parts` calls on channel groups (concatenated back), and as
  one call elsewhere. `channel_axes[i]` is the channel axis of args[i] (None: shared). Every
  output of fn is [..., C, L']-shaped with channels at axis -2."""
  parts = _cpu_parts(channels)
  if parts == 1:
    return fn(*args)
  bounds = [channels * i // parts for i in range(parts + 1)]

  def split(*args):
    outs = [fn(*[a if ax is None else jax.lax.slice_in_dim(a, lo, hi, axis=ax)
                 for a, ax in zip(args, channel_axes)])
            for lo, hi in zip(bounds, bounds[1:])]
    return tuple(jnp.concatenate(xs, axis=-2) for xs in zip(*outs))

  # Lowering keeps one branch: the split on CPU, the single call on GPU/TPU.
  return jax.lax.platform_dependent(*args, cpu=split, default=fn)


@jax.custom_vjp
def _causal_conv(u: jax.Array, k: jax.Array) -> jax.Array:
  """u [B, C, L] float32, k [C, L] float32 -> sum_{s<=t} k[c, t-s] u[b, c, s]: [B, C, L]."""
  return _causal_conv_fwd(u, k)[0]


def _causal_conv_fwd(u, k):
  length = u.shape[-1]
  n = fft_size(2 * length - 1)

  def fwd(u, k):
    u_f, k_f = jnp.fft.rfft(u, n=n), jnp.fft.rfft(k, n=n)
    return jnp.fft.irfft(u_f * k_f, n=n)[..., :length], u_f, k_f

  y, u_f, k_f = _by_channels(fwd, (u, k), (1, 0), u.shape[1])
  return y, (u_f, k_f)


def _causal_conv_bwd(res, dy):
  """The adjoint is a causal correlation: du = irfft(DY conj(K)), dk = sum_b irfft(DY conj(U))."""
  u_f, k_f = res
  length = dy.shape[-1]
  n = fft_size(2 * length - 1)

  def bwd(dy, u_f, k_f):
    dy_f = jnp.fft.rfft(dy, n=n)
    du = jnp.fft.irfft(dy_f * jnp.conj(k_f), n=n)[..., :length]
    dk = jnp.fft.irfft((dy_f * jnp.conj(u_f)).sum(axis=0), n=n)[..., :length]
    return du, dk

  return _by_channels(bwd, (dy, u_f, k_f), (1, 1, 0), dy.shape[1])


_causal_conv.defvjp(_causal_conv_fwd, _causal_conv_bwd)


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
  u32 = u.astype(jnp.float32)
  y = _causal_conv(u32, k.astype(jnp.float32))
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


def long_conv(u: jax.Array, k: jax.Array, d_bias: jax.Array, gate: jax.Array | None = None, *,
              impl: str) -> jax.Array:
  """The long-convolution dispatch: `impl` is the model's `conv_impl`, honoured on every path.

  Same contract as `fft_long_conv` (u [B, C, L], k [C, L], d_bias [C], gate [B, C, L] or None;
  returns [B, C, L] in u's dtype). "pallas" calls `pallas_conv.long_conv` with its defaults (its
  interpreter on CPU).
  """
  if impl == "fft":
    return fft_long_conv(u, k, d_bias, gate)
  if impl == "pallas":
    # Imported lazily: Pallas is optional at import time.
    from hyena_jax.model.kernels import pallas_conv  # pylint: disable=g-import-not-at-top
    return pallas_conv.long_conv(u, k, d_bias, gate)
  raise InputError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")


def decoding_filter(k: jax.Array) -> jax.Array:
  """k [C, T] -> [C, 2T] = [k reversed | zeros]: its length-T slice at T-1-t is
  [k[t - s] if s <= t else 0 for s < T], the taps that reach position t (see `long_conv_step`)."""
  return jnp.concatenate([k[:, ::-1], jnp.zeros_like(k)], axis=1)


def long_conv_step(u: jax.Array, k_rev: jax.Array, d_bias: jax.Array, t: jax.Array
                   ) -> jax.Array:
  """Output position t of the causal convolution with its skip term (no gate).

  Args:
    u: [B, C, T] float32 inputs up to and including position t (later ones meet zero taps).
    k_rev: [C, 2T] from `decoding_filter`.
    d_bias: [C] skip term D.
    t: the position (may be traced).

  Returns:
    [B, C] float32, sum_{s <= t} k[c, t - s] u[b, c, s] + D[c] u[b, c, t]: O(T C) per call.
  """
  length = u.shape[-1]
  k_t = jax.lax.dynamic_slice_in_dim(k_rev, length - 1 - t, length, axis=1)   # [C, T]
  y = jnp.einsum("bcs,cs->bc", u, k_t, precision=jax.lax.Precision.HIGHEST)
  u_t = jax.lax.dynamic_index_in_dim(u, t, axis=2, keepdims=False)
  return y + u_t * d_bias.astype(jnp.float32)[None, :]
