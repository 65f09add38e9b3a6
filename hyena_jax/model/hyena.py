"""The Hyena operator (order 2) of HyenaDNA, in Flax NNX: every stage of the mixer lives here.

Stages (`HyenaOperator` methods and members), composed by three callers that share them:
  * `project`: in_proj + the 3-tap `ShortFilter`, with an optional halo (the two positions
    before the input: zeros, a ppermute from the previous shard, or a decoding cache);
  * `filter_fn` (`HyenaFilter`): the implicit long filter for positions start .. start+L-1;
  * `long_conv`: the long convolution through `fftconv.long_conv`, the one dispatch (fftconv.py
    holds all convolution maths), with the mixer's conv_impl and pallas_spectra_dtype;
  * `output`: gating (when the convolution did not fuse it) and out_proj;
  * `prefill` / `step`: cached decoding, the forward over a buffer plus a `DecodeCache`, then one
    position at a time.
Callers: `__call__` (hyenadna.py's Block, the whole sequence), context_parallel._mixer (a sequence
shard, all-to-all around the long convolution), generate.py (prefill, step). The residual block
around the mixer (norms, MLP) is model.Block, written once for all three.

Precision: the implicit-filter MLP (including sin(w * Wz)) runs its matmuls at
`Precision.HIGHEST`: on TPU the default float32 matmul is one bfloat16 pass and the filter's
error would reach every position of the long convolution. Projections follow `dtype`.

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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from hyena_jax.model import fftconv

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
    highest = jax.lax.Precision.HIGHEST  # float32 accuracy on TPU/GPU too (module docstring)
    layers = [nnx.Linear(a, b, kernel_init=init, precision=highest, rngs=rngs)
              for a, b in zip(widths, widths[1:])]
    layers.append(nnx.Linear(filter_order, d_model, use_bias=False, kernel_init=init,
                             precision=highest, rngs=rngs))
    self.implicit_filter = nnx.List(layers)
    # One Sin frequency shared by every activation, as upstream.
    self.freq = nnx.Param(jnp.full((1, filter_order), activation_freq, jnp.float32))
    self.bias = nnx.Param(jax.random.normal(rngs.params(), (d_model,), jnp.float32))

  def __call__(self, length: int, *, start: int | jax.Array = 0) -> jax.Array:
    """Returns the filter k: [d_model, length] in float32 (the FFT runs in float32).

    With `start`, returns taps start .. start+length-1 instead (a context-parallel shard's own
    positions); taps at or beyond l_max are extrapolations that the caller must mask.
    """
    h, t = self.features(length, start=start)
    return self.taps(h, t)

  def features(self, length: int, *, start: int | jax.Array = 0
               ) -> tuple[jax.Array, jax.Array]:
    """The MLP up to its last layer, shared by every channel: (h [length, filter_order],
    t [length, 1]) for positions start .. start+length-1."""
    if length > self.l_max:
      raise ValueError(f"sequence length {length} exceeds l_max={self.l_max}")
    z, t = positional_features(length, self.l_max, self.emb_dim, start)
    h = z
    for layer in self.implicit_filter[:-1]:
      h = jnp.sin(self.freq[...] * layer(h))
    return h, t

  def taps(self, h: jax.Array, t: jax.Array, channels: tuple[jax.Array | int, int] | None = None
           ) -> jax.Array:
    """The filter of `channels` = (first, count) (all by default; first may be traced) from
    `features`: [count, length] float32."""
    last = self.implicit_filter[-1]
    kernel, rates = last.kernel[...], jnp.abs(decay_rates(self.d_model))
    if channels is not None:
      first, count = channels
      kernel = jax.lax.dynamic_slice_in_dim(kernel, first, count, axis=1)
      rates = jax.lax.dynamic_slice_in_dim(rates, first, count)
    # The last layer as kernel^T h^T, [d, F] x [F, length]: k comes out channels-first, as the
    # FFT wants it, instead of being transposed (XLA:CPU fused that transpose with the
    # modulation and the FFT's zero padding, in transposed order: 3 ms per layer at 8k).
    k = jax.lax.dot_general(kernel, h, (((0,), (1,)), ((), ())),
                            precision=last.precision)                # [channels, length]
    if self.modulate:
      k = k * (jnp.exp(-t.T * rates[:, None]) + self.shift)
    return k


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

  def __call__(self, u: jax.Array, halo: jax.Array | None = None,
               channels: slice = slice(None)) -> jax.Array:
    """u: [batch, c, length] -> same shape, filtered with this layer's `channels` (all by default).

    `halo` ([batch, c, taps-1]) holds the positions just before u (from the previous shard in
    context parallelism, from the cache in decoding); None means zeros, i.e. u starts the
    sequence.
    """
    taps = self.kernel.shape[0]
    length = u.shape[-1]
    if halo is None:
      halo = jnp.zeros(u.shape[:-1] + (taps - 1,), u.dtype)
    halo = halo.astype(u.dtype)

    def delayed(k: int) -> jax.Array:
      """u[t - k], the halo supplying t < k. Built on the output side (halo tail ++ u[:L-k])
      rather than as slices of one padded array: the same values, and on CPU about half the
      time forward and backward, since every output row stays aligned with u's."""
      head = halo[..., taps - 1 - k:]
      if length <= k:
        return head[..., :length]
      return jnp.concatenate([head, u[..., :length - k]], axis=-1) if k else u

    w = self.kernel[...][:, 0, channels].astype(u.dtype)             # [taps, c]
    out = self.bias[...][channels].astype(u.dtype)[:, None]
    for j in range(taps):  # unrolled over the 3 taps, not over length
      out = out + w[j][:, None] * delayed(taps - 1 - j)
    return out


class DecodeCache(NamedTuple):
  """One layer's state for cached decoding at a buffer of T positions (see `HyenaOperator.step`)."""
  z_prev: jax.Array   # [B, 3d, 2] in_proj outputs of the two previous positions (short filter)
  u: jax.Array        # [B, d, T] float32 long-conv inputs v * x1 so far (zeros beyond)
  k_rev: jax.Array    # [d, 2T] float32 the filter as `fftconv.decoding_filter` lays it out


class HyenaOperator(nnx.Module):
  """Order-2 Hyena mixer: in_proj, short conv -> x0, x1, v; (k * (v x1) + D v x1) x0 -> out_proj.

  Stages, composed by `__call__` (whole sequence), context_parallel._mixer (a sequence shard)
  and `prefill`/`step` (cached decoding):
    `project`    in_proj + short filter, with an optional halo (the two positions before u)
    `filter_fn`  the implicit filter k for a range of positions (`HyenaFilter.__call__`)
    `long_conv`  the long convolution through `fftconv.long_conv`, the one dispatch, with this
                 mixer's conv_impl and pallas_spectra_dtype
    `output`     gating (when the convolution did not fuse it) and out_proj
    `step`       one position on a `DecodeCache`
  """

  def __init__(self, d_model: int, *, l_max: int, n_layer: int, emb_dim: int, filter_order: int,
               num_inner_mlps: int, activation_freq: float, shift: float, modulate: bool,
               initializer_range: float, dtype: jnp.dtype, conv_impl: str,
               pallas_spectra_dtype: str = "float32", rngs: nnx.Rngs):
    self.d_model, self.dtype, self.conv_impl = d_model, dtype, conv_impl
    self.pallas_spectra_dtype = pallas_spectra_dtype
    init = _normal(initializer_range)
    self.in_proj = nnx.Linear(d_model, 3 * d_model, kernel_init=init, dtype=dtype, rngs=rngs)
    self.out_proj = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs,
                               kernel_init=_normal(initializer_range / math.sqrt(2 * n_layer)))
    self.short_filter = ShortFilter(3 * d_model, rngs=rngs)
    self.filter_fn = HyenaFilter(
        d_model, l_max=l_max, emb_dim=emb_dim, filter_order=filter_order,
        num_inner_mlps=num_inner_mlps, activation_freq=activation_freq, shift=shift,
        modulate=modulate, initializer_range=initializer_range, rngs=rngs)

  def project(self, u: jax.Array, halo: jax.Array | Callable[[jax.Array], jax.Array] | None = None
              ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """in_proj and the short filter. u: [B, L, d] -> (x0, x1, v) each [B, d, L], and z.

    The mixer works channels-first (the FFT runs along the last axis), and the matmuls produce
    and consume that layout themselves: on CPU an explicit transpose gets fused with the
    elementwise work around it and runs in cache-hostile order (the slowest part of the mixer
    when written that way). x0, x1 and v each come from their own third of in_proj's kernel,
    so no [B, 3d, L] array is sliced along its channels. z is in_proj's output [B, 3d, L]
    before the short filter (what a decoding cache keeps). `halo` is the short filter's input
    at the 2 positions before u, [B, 3d, 2]: a `DecodeCache.z_prev`, or a function of z's last
    2 positions that fetches it (context parallelism: from the previous shard); None = zeros,
    i.e. u starts the sequence.
    """
    batch, length, d = u.shape
    taps = self.short_filter.kernel.shape[0]
    u = u.astype(self.dtype)
    kernel = self.in_proj.kernel[...].astype(self.dtype)             # [d, 3d]
    bias = self.in_proj.bias[...].astype(self.dtype)
    thirds = [slice(i * d, (i + 1) * d) for i in range(3)]
    # Per sequence: kernel^T u^T, [e, d] x [d, L] -> [e, L] (a batched matmul).
    kernels = jnp.broadcast_to(kernel, (batch,) + kernel.shape)      # [B, d, 3d]
    zs = [jax.lax.dot_general(kernels[..., part], u, (((1,), (2,)), ((0,), (0,))),
                              precision=self.in_proj.precision) + bias[part][:, None]
          for part in thirds]
    if callable(halo):
      halo = halo(jnp.concatenate([z[..., length - (taps - 1):] for z in zs], axis=1))
    x0, x1, v = (self.short_filter(z, None if halo is None else halo[:, part], channels=part)
                 for z, part in zip(zs, thirds))
    # z is only used by decoding; under jit an unused z costs nothing (dead code).
    return x0, x1, v, jnp.concatenate(zs, axis=1)

  def output(self, y: jax.Array, gate: jax.Array | None = None) -> jax.Array:
    """y: [B, d, L] long-conv output -> [B, L, d] (compute dtype) after `* gate` and out_proj.

    Pass `gate` (x0, [B, d, L]) when the convolution did not apply it; the product is float32.
    """
    if gate is not None:
      y = y.astype(jnp.float32) * gate.astype(jnp.float32)
    kernel = self.out_proj.kernel[...].astype(self.dtype)            # [d, d]
    kernels = jnp.broadcast_to(kernel, (y.shape[0],) + kernel.shape)  # [B, d, e]
    # Per sequence: kernel^T y, [e, d] x [d, L] -> [e, L] (y as it is), then to [B, L, e].
    out = jax.lax.dot_general(kernels, y.astype(self.dtype), (((1,), (1,)), ((0,), (0,))),
                              precision=self.out_proj.precision)
    return out.transpose(0, 2, 1) + self.out_proj.bias[...].astype(self.dtype)

  def _forward(self, u: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The whole-sequence mixer; also returns (z, v x1, k) for `prefill`'s cache."""
    x0, x1, v, z = self.project(u)
    vx = v * x1                                                       # [B, d, L]
    k = self.filter_fn(u.shape[1])                                    # [d, L] float32
    y = self.long_conv(vx, k, self.filter_fn.bias[...], x0)
    return self.output(y), (z, vx, k)

  def long_conv(self, u: jax.Array, k: jax.Array, d_bias: jax.Array,
                gate: jax.Array | None = None) -> jax.Array:
    """`fftconv.long_conv` as this mixer executes it: u, gate [B, C, L], k [C, L], d_bias [C]."""
    return fftconv.long_conv(u, k, d_bias, gate, impl=self.conv_impl,
                             pallas_spectra_dtype=self.pallas_spectra_dtype)

  def __call__(self, u: jax.Array) -> jax.Array:
    """u: [B, L, d] -> [B, L, d] in the compute dtype."""
    return self._forward(u)[0]

  def prefill(self, u: jax.Array, start: jax.Array) -> tuple[jax.Array, DecodeCache]:
    """`__call__` over a decoding buffer u [B, T, d], plus the cache of positions < start.

    The long convolution goes through the `conv_impl` dispatch, like `__call__`.
    """
    y, (z, vx, k) = self._forward(u)
    length = u.shape[1]
    keep = (jnp.arange(length) < start)[None, None, :]
    z_pad = jnp.concatenate([jnp.zeros(z.shape[:2] + (2,), z.dtype), z], axis=-1)
    return y, DecodeCache(z_prev=jax.lax.dynamic_slice_in_dim(z_pad, start, 2, axis=2),
                          u=vx.astype(jnp.float32) * keep, k_rev=fftconv.decoding_filter(k))

  def step(self, u: jax.Array, cache: DecodeCache, t: jax.Array
           ) -> tuple[jax.Array, DecodeCache]:
    """One position: u [B, 1, d] at position t -> ([B, 1, d], the cache advanced past t).

    The long convolution at one position is a dot product over the cached inputs
    (`fftconv.long_conv_step`), O(T d), the same for every conv_impl: there is no sequence
    left to convolve, so neither the FFT nor the Pallas kernel applies.
    """
    x0, x1, v, z = self.project(u, halo=cache.z_prev)
    hist = jax.lax.dynamic_update_slice_in_dim(cache.u, (v * x1).astype(jnp.float32), t, axis=2)
    y = fftconv.long_conv_step(hist, cache.k_rev, self.filter_fn.bias[...], t)   # [B, d]
    z_prev = jnp.concatenate([cache.z_prev[..., 1:], z], axis=-1)
    return self.output(y[..., None], gate=x0), DecodeCache(z_prev, hist, cache.k_rev)
