"""The Hyena operator (order 2) of HyenaDNA, in Flax NNX.

Differences from the official PyTorch code, all deliberate and none numerical:
  * The positional features `z`, `t` and the decay rates `deltas` are deterministic functions of
    `l_max`, so they are recomputed (float32, first L rows only) instead of being stored; the
    importer checks that a checkpoint's buffers equal them.
  * The implicit-filter MLP is `filter_fn.implicit_filter[0..n]` (Linear layers only) with one
    shared `filter_fn.freq`; upstream interleaves Sin modules (`implicit_filter.{0,2,4,6}` are
    the Linears, `.1/.3/.5.freq` the same shared tensor).
  * The long convolution uses an FFT of 5-smooth length >= 2L-1 instead of exactly 2L (same
    result, see fftconv.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from hyena_jax import fftconv

_normal = nnx.initializers.normal


def positional_features(length: int, l_max: int, emb_dim: int,
                        start: int | jax.Array = 0) -> tuple[jax.Array, jax.Array]:
  """Rows start .. start+length-1 of the filter's positional grid, built for `l_max`.

  Returns z: [length, emb_dim] = [t, cos(f_j w), ..., -sin(f_j w), ...] and t: [length, 1],
  with t_i = i / (l_max - 1), w_i = 2 pi i / l_max, f = linspace(1e-4, bands - 1, bands).
  `start` (may be traced) lets a sequence shard build only its own rows (context parallelism).
  """
  bands = (emb_dim - 1) // 2
  i = (jnp.arange(length) + start).astype(jnp.float32)[:, None]
  t = i * jnp.float32(1.0 / (l_max - 1))
  w = i * jnp.float32(2.0 * math.pi / l_max)
  f = jnp.linspace(1e-4, bands - 1, bands, dtype=jnp.float32)[None, :]
  z = jnp.concatenate([t, jnp.cos(f * w), -jnp.sin(f * w)], axis=-1)
  return z, t


def decay_rates(d_model: int, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                target: float = 1e-2) -> jax.Array:
  """Per-channel exponential-modulation rates `deltas`: [d_model], channel 0 decays slowest."""
  return jnp.linspace(math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct,
                      d_model, dtype=jnp.float32)


class HyenaFilter(nnx.Module):
  """Implicit long filter k = MLP(z) * (exp(-t |deltas|) + shift), plus the skip term D (`bias`)."""

  def __init__(self, d_model: int, *, l_max: int, emb_dim: int, filter_order: int,
               num_inner_mlps: int, activation_freq: float, shift: float, modulate: bool,
               initializer_range: float, rngs: nnx.Rngs):
    self.d_model, self.l_max, self.emb_dim = d_model, l_max, emb_dim
    self.shift, self.modulate = shift, modulate
    init = _normal(initializer_range)
    widths = [emb_dim] + [filter_order] * (num_inner_mlps + 1)
    layers = [nnx.Linear(a, b, kernel_init=init, rngs=rngs) for a, b in zip(widths, widths[1:])]
    layers.append(nnx.Linear(filter_order, d_model, use_bias=False, kernel_init=init, rngs=rngs))
    self.implicit_filter = nnx.List(layers)
    # One Sin frequency shared by every activation, as upstream.
    self.freq = nnx.Param(jnp.full((1, filter_order), activation_freq, jnp.float32))
    self.bias = nnx.Param(jax.random.normal(rngs.params(), (d_model,), jnp.float32))

  def __call__(self, length: int, *, start: int | jax.Array = 0) -> jax.Array:
    """Returns the filter k: [d_model, length] in float32 (the FFT runs in float32).

    With `start`, returns taps start .. start+length-1 instead (a context-parallel shard's own
    positions); taps at or beyond l_max are extrapolations that the caller must mask.
    """
    if length > self.l_max:
      raise ValueError(f"sequence length {length} exceeds l_max={self.l_max}")
    z, t = positional_features(length, self.l_max, self.emb_dim, start)
    h = z
    for layer in self.implicit_filter[:-1]:
      h = jnp.sin(self.freq[...] * layer(h))
    h = self.implicit_filter[-1](h)                                   # [length, d_model]
    if self.modulate:
      h = h * (jnp.exp(-t * jnp.abs(decay_rates(self.d_model))) + self.shift)
    return h.T


class ShortFilter(nnx.Module):
  """Causal depthwise convolution with 3 taps: out[t] = b + W0 u[t-2] + W1 u[t-1] + W2 u[t].

  `kernel` is [3, 1, channels] (Flax Conv layout; PyTorch Conv1d weight [channels, 1, 3]).
  """

  def __init__(self, channels: int, *, rngs: nnx.Rngs, taps: int = 3):
    bound = 1.0 / math.sqrt(taps)  # PyTorch Conv1d default init, fan_in = taps
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (taps, 1, channels), jnp.float32,
                                               -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (channels,), jnp.float32,
                                             -bound, bound))

  def __call__(self, u: jax.Array, halo: jax.Array | None = None) -> jax.Array:
    """u: [batch, channels, length] -> same shape.

    `halo` ([batch, channels, taps-1]) holds the positions just before u (context parallelism);
    None means zeros, i.e. u starts the sequence.
    """
    taps = self.kernel.shape[0]
    length = u.shape[-1]
    if halo is None:
      halo = jnp.zeros(u.shape[:-1] + (taps - 1,), u.dtype)
    padded = jnp.concatenate([halo.astype(u.dtype), u], axis=-1)
    w = self.kernel[...][:, 0, :].astype(u.dtype)                    # [taps, channels]
    out = self.bias[...].astype(u.dtype)[:, None]
    for j in range(taps):  # unrolled over the 3 taps, not over length
      out = out + w[j][:, None] * padded[..., j:j + length]
    return out


class HyenaOperator(nnx.Module):
  """Order-2 Hyena mixer: in_proj -> short conv -> x0 | x1 | v -> (k * (v x1) + D v x1) x0 -> out_proj."""

  def __init__(self, d_model: int, *, l_max: int, n_layer: int, emb_dim: int, filter_order: int,
               num_inner_mlps: int, activation_freq: float, shift: float, modulate: bool,
               initializer_range: float, dtype: jnp.dtype, conv_impl: str, rngs: nnx.Rngs):
    self.d_model, self.dtype, self.conv_impl = d_model, dtype, conv_impl
    init = _normal(initializer_range)
    self.in_proj = nnx.Linear(d_model, 3 * d_model, kernel_init=init, dtype=dtype, rngs=rngs)
    self.out_proj = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs,
                               kernel_init=_normal(initializer_range / math.sqrt(2 * n_layer)))
    self.short_filter = ShortFilter(3 * d_model, rngs=rngs)
    self.filter_fn = HyenaFilter(
        d_model, l_max=l_max, emb_dim=emb_dim, filter_order=filter_order,
        num_inner_mlps=num_inner_mlps, activation_freq=activation_freq, shift=shift,
        modulate=modulate, initializer_range=initializer_range, rngs=rngs)

  def long_conv(self, v: jax.Array, k: jax.Array, gate: jax.Array) -> jax.Array:
    """(causal_conv(v, k) + D v) * gate, all [batch, d_model, length]."""
    d_bias = self.filter_fn.bias[...]
    if self.conv_impl == "pallas":
      from hyena_jax import pallas_conv  # imported lazily: Pallas is optional at import time
      return pallas_conv.long_conv(v, k, d_bias, gate)
    return fftconv.fft_long_conv(v, k, d_bias, gate)

  def __call__(self, u: jax.Array) -> jax.Array:
    """u: [batch, length, d_model] -> [batch, length, d_model] in the compute dtype."""
    batch, length, d = u.shape
    # Projections on 2-D [batch*length, C] arrays: their backward is a plain matmul on CPU.
    z = self.in_proj(u.reshape(batch * length, d).astype(self.dtype))
    z = z.reshape(batch, length, 3 * d).transpose(0, 2, 1)           # [batch, 3d, length]
    z = self.short_filter(z)
    x0, x1, v = z[:, :d], z[:, d:2 * d], z[:, 2 * d:]
    k = self.filter_fn(length)                                        # [d, length], float32
    y = self.long_conv(v * x1, k, gate=x0)                            # [batch, d, length]
    y = y.transpose(0, 2, 1).reshape(batch * length, d)
    return self.out_proj(y).reshape(batch, length, d)
