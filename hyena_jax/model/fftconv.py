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


# On GPU/TPU the FFTs of a long sequence run over channel groups one after another, each group's
# spectra taking at most this many bytes: at 1M tokens a 256-channel layer's float32 spectra and
# products would otherwise be ~10 GiB of temporaries at once (issue 24).
_GROUP_BYTES = 2 ** 29


def _accelerator_groups(channels: int, spectrum_bytes: int) -> int:
  """Channel groups for GPU/TPU: the fewest (dividing `channels`) whose spectra fit in
  `_GROUP_BYTES`; `spectrum_bytes` is one channel's (all sequences of the batch)."""
  per_group = max(1, min(channels, _GROUP_BYTES // max(1, spectrum_bytes)))
  while channels % per_group:
    per_group -= 1
  return channels // per_group


def _by_channels(fn: Callable[..., tuple], args: tuple, channel_axes: tuple, channels: int,
                 spectrum_bytes: int) -> tuple:
  """fn(*args), run on CPU as `_cpu_parts` concurrent calls on channel groups, and on GPU/TPU as
  `_accelerator_groups` sequential ones (lax.map), outputs concatenated back. `channel_axes[i]`
  is the channel axis of args[i] (None: shared). Every output of fn is [..., C, L']-shaped with
  channels at axis -2."""
  parts = _cpu_parts(channels)
  bounds = [channels * i // parts for i in range(parts + 1)]

  def concurrent(*args):
    outs = [fn(*[a if ax is None else jax.lax.slice_in_dim(a, lo, hi, axis=ax)
                 for a, ax in zip(args, channel_axes)])
            for lo, hi in zip(bounds, bounds[1:])]
    return tuple(jnp.concatenate(xs, axis=-2) for xs in zip(*outs))

  groups = _accelerator_groups(channels, spectrum_bytes)

  def sequential(*args):
    if groups == 1:
      return fn(*args)
    split = [None if ax is None else jnp.moveaxis(
        a.reshape(a.shape[:ax] + (groups, channels // groups) + a.shape[ax + 1:]), ax, 0)
             for a, ax in zip(args, channel_axes)]

    def one(xs):
      return fn(*[a if x is None else x for a, x in zip(args, xs)])
    outs = jax.lax.map(one, split)
    return tuple(jnp.moveaxis(y, 0, -3).reshape(y.shape[1:-2] + (channels, y.shape[-1]))
                 for y in outs)

  if parts == 1:
    return sequential(*args)
  # Lowering keeps one branch: the concurrent split on CPU, the sequential one on GPU/TPU.
  return jax.lax.platform_dependent(*args, cpu=concurrent, default=sequential)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _causal_conv(u: jax.Array, k: jax.Array, saved_dtype: str) -> jax.Array:
  """u [B, C, L] float32, k [C, L] float32 -> sum_{s<=t} k[c, t-s] u[b, c, s]: [B, C, L].
  `saved_dtype`: the dtype u came in (float32 holds it exactly), which a long convolution keeps
  u in for its backward."""
  return _causal_conv_fwd(u, k, saved_dtype)[0]


def _spectrum_bytes(batch: int, n: int) -> int:
  return batch * (n // 2 + 1) * 8   # complex64


def _causal_conv_fwd(u, k, saved_dtype):
  length = u.shape[-1]
  n = fft_size(2 * length - 1)
  spectrum_bytes = _spectrum_bytes(u.shape[0], n)

  def fwd(u, k):
    u_f, k_f = jnp.fft.rfft(u, n=n), jnp.fft.rfft(k, n=n)
    return jnp.fft.irfft(u_f * k_f, n=n)[..., :length], u_f, k_f

  y, u_f, k_f = _by_channels(fwd, (u, k), (1, 0), u.shape[1], spectrum_bytes)
  if _accelerator_groups(u.shape[1], spectrum_bytes) > 1:
    # Long sequences keep the inputs (u in the dtype it came in, exactly), not their spectra, for
    # the backward, which recomputes the spectra group by group: all channels' spectra at once
    # are what the groups avoid (H100, large-1m at 1M tokens: 28.4 GiB peak; 31.4 keeping the
    # spectra, 30.4 ungrouped, 29.4 keeping u in float32).
    return y, (u.astype(saved_dtype), k)
  return y, (u_f, k_f)


def _causal_conv_bwd(saved_dtype, res, dy):
  """The adjoint is a causal correlation: du = irfft(DY conj(K)), dk = sum_b irfft(DY conj(U))."""
  del saved_dtype
  length = dy.shape[-1]
  n = fft_size(2 * length - 1)
  have_spectra = jnp.iscomplexobj(res[0])

  def bwd(dy, u, k):
    if have_spectra:
      u_f, k_f = u, k
    else:
      u_f, k_f = jnp.fft.rfft(u.astype(jnp.float32), n=n), jnp.fft.rfft(k, n=n)
    dy_f = jnp.fft.rfft(dy, n=n)
    du = jnp.fft.irfft(dy_f * jnp.conj(k_f), n=n)[..., :length]
    dk = jnp.fft.irfft((dy_f * jnp.conj(u_f)).sum(axis=0), n=n)[..., :length]
    return du, dk

  return _by_channels(bwd, (dy, *res), (1, 1, 0), dy.shape[1], _spectrum_bytes(dy.shape[0], n))


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
  y = _causal_conv(u32, k.astype(jnp.float32), jnp.dtype(u.dtype).name)
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
              impl: str, pallas_spectra_dtype: str = "float32") -> jax.Array:
  """The long-convolution dispatch: `impl` is the model's `conv_impl`, honoured on every path.

  Same contract as `fft_long_conv` (u [B, C, L], k [C, L], d_bias [C], gate [B, C, L] or None;
  returns [B, C, L] in u's dtype). "pallas" calls `pallas_conv.long_conv` with its defaults (its
  interpreter on CPU) but for `pallas_spectra_dtype`, the dtype of its stored spectra (the fft
  path stores none and ignores it).
  """
  if impl == "fft":
    return fft_long_conv(u, k, d_bias, gate)
  if impl == "pallas":
    # Imported lazily: Pallas is optional at import time.
    from hyena_jax.model.kernels import pallas_conv  # pylint: disable=g-import-not-at-top
    return pallas_conv.long_conv(u, k, d_bias, gate, spectra_dtype=pallas_spectra_dtype)
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
