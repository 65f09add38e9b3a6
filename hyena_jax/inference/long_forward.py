"""A forward pass in bounded memory, for contexts up to l_max (1M tokens) on an ordinary host.

One jitted whole-model forward keeps every layer's activations of the whole sequence alive at
once (in_proj's [L, 3d], the MLP's [L, 4d], the FFT buffers of all channels). Here everything
but the long convolution is position-wise, so it runs on chunks of `chunk` positions, and the
long convolution runs on groups of `group` channels; one jitted call per layer (compiled once,
reused for every layer) updates the residual stream in place (donated). What lives at once:

    the residual stream x      [B, L, d] float32
    the long-conv input v * x1 [B, d, L] (its output overwrites it, group by group)
    the gate x0                [B, d, L]
    the filter MLP's features  [L, filter_order] float32
    one chunk's and one group's temporaries (a group's FFTs: ~32 bytes per channel per position)

i.e. about 3 x B x L x d x 4 bytes plus a few hundred MB: 3 GiB for large-1m at 1M tokens,
against ~36 GB for the jitted forward. Results equal the plain forward up to float32 round-off
(the same operations; matmuls and FFTs see other shapes).

    hidden, layers = long_forward.hidden_states(model, ids)          # ids [B, L]
    logp = long_forward.token_log_probs(model, ids)                  # [B, L], entry 0 NaN

`max_memory_gb` (default: 80% of the memory the host has available) sizes chunk and group; a
request that cannot fit is an InputError naming the longest length that would. embed and score
come here only when the jitted forward would not fit (`wants_long_path`): where it fits it is
faster.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyena_jax.errors import InputError
from hyena_jax.model import fftconv
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import check_input_ids

GIB = 2.0 ** 30
_FFT_BYTES_PER_POINT = 32     # rfft of u and k, their product, the irfft: complex64 + float32
_CHUNK_BYTES_PER_WIDTH = 48   # per position per d: norm, in_proj thirds, MLP hidden (4d), output


@dataclasses.dataclass(frozen=True)
class Plan:
  chunk: int     # positions per position-wise step
  group: int     # channels per long-convolution step
  bytes: int     # the estimated peak of the forward


def available_gb() -> float:
  """Memory the host can give this process now (Linux: MemAvailable), in GiB."""
  try:
    with open("/proc/meminfo") as f:
      info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024 / GIB
  except (OSError, KeyError, ValueError):
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def plain_forward_gb(cfg: HyenaConfig, batch: int, length: int) -> float:
  """The peak of the jitted whole-model forward on XLA:CPU, as measured: ~33 floats per position
  per d_model channel plus 0.5 GB (large-1m: 4.6 GB at 131k tokens, 8.8 GB at 262k;
  benchmarks/bench_long_inference.py)."""
  return (33 * batch * length * cfg.d_model * 4) / GIB + 0.5


def wants_long_path(cfg: HyenaConfig, batch: int, length: int,
                    max_memory_gb: float | None = None) -> bool:
  """Whether embed and score run [batch, length] here rather than as one jitted forward: only
  when that would not fit the budget (the jitted forward is faster: 67 s against 86 s for
  large-1m at 262k tokens on 2 cores)."""
  budget = 0.8 * available_gb() if max_memory_gb is None else max_memory_gb
  return plain_forward_gb(cfg, batch, length) > budget


def _stream_bytes(cfg: HyenaConfig, batch: int, length: int, kept_layers: int) -> int:
  """What lives for the whole forward: x, v*x1 (then the conv output), x0, the kept layers,
  the filter features and the parameters."""
  per_position = batch * cfg.d_model * 4
  params = 4 * cfg.n_layer * (12 * cfg.d_model ** 2 + cfg.filter_order ** 2 * 3)
  return ((3 + kept_layers) * per_position * length + length * cfg.filter_order * 4
          + params + (256 << 20))  # 256 MiB: XLA's and the runtime's own


def plan(cfg: HyenaConfig, batch: int, length: int, *, max_memory_gb: float | None = None,
         kept_layers: int = 0) -> Plan:
  """Chunk and group sizes for a forward of [batch, length] tokens within `max_memory_gb`."""
  budget = (0.8 * available_gb() if max_memory_gb is None else max_memory_gb) * GIB
  fixed = _stream_bytes(cfg, batch, length, kept_layers)
  n_fft = fftconv.fft_size(2 * length - 1)
  # 32 channels keep two cores busy (fftconv splits a group per core, >= 16 channels each).
  for group in (32, 16, 64, 8, 4, 2, 1):
    if cfg.d_model % group:
      continue
    fft = group * batch * n_fft * _FFT_BYTES_PER_POINT
    for chunk in (65536, 32768, 16384, 8192, 4096, 2048):
      chunk = min(chunk, length)
      work = chunk * batch * cfg.d_model * _CHUNK_BYTES_PER_WIDTH
      if fixed + max(fft, work) <= budget:
        return Plan(chunk, group, int(fixed + max(fft, work)))
  per_token = (3 + kept_layers) * batch * cfg.d_model * 4 + cfg.filter_order * 4
  fits = max(0, int((budget - fixed + per_token * length) // (per_token * 1.25)))
  raise InputError(
      f"a forward of {batch} x {length:,} tokens needs at least {fixed / GIB:.1f} GiB, more than "
      f"the {budget / GIB:.1f} GiB allowed (max_memory_gb); about {fits:,} tokens per sequence "
      "fit, or raise max_memory_gb / free memory")


def _chunk_starts(length: int, chunk: int) -> int:
  return -(-length // chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "group"), donate_argnums=(2,))
def _layer(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, *, chunk: int, group: int
           ) -> jax.Array:
  """One block on x [B, L, d] float32, in chunks of positions and groups of channels."""
  block = nnx.merge(graphdef, state)
  mixer = block.mixer
  batch, length, d = x.shape
  n_chunks = _chunk_starts(length, chunk)
  rows = jnp.arange(chunk)

  def start_of(i):
    # The last chunk ends at L: it starts earlier and overlaps rows already done.
    return jnp.minimum(i * chunk, length - chunk)

  # 1. in_proj and the short filter, chunk by chunk: the long convolution's input and gate.
  def project(i, bufs):
    vx_buf, gate_buf = bufs
    s = start_of(i)
    u = block.norm1(jax.lax.dynamic_slice_in_dim(x, s, chunk, axis=1)).astype(block.dtype)
    prev = jax.lax.dynamic_slice_in_dim(x, jnp.maximum(s - 2, 0), 2, axis=1)
    _, _, _, z_prev = mixer.project(block.norm1(prev).astype(block.dtype))  # [B, 3d, 2]
    z_prev = jnp.where(s >= 2, z_prev, jnp.zeros_like(z_prev))              # s = 0: no history
    x0, x1, v, _ = mixer.project(u, halo=z_prev)
    vx_buf = jax.lax.dynamic_update_slice_in_dim(vx_buf, v * x1, s, axis=2)
    gate_buf = jax.lax.dynamic_update_slice_in_dim(gate_buf, x0, s, axis=2)
    return vx_buf, gate_buf

  dtype = block.dtype
  empty = jnp.zeros((batch, d, length), dtype)
  vx, gate = jax.lax.fori_loop(0, n_chunks, project, (empty, empty))

  # 2. The long convolution, group by group of channels; its output overwrites its input.
  h, t = mixer.filter_fn.features(length)
  d_bias = mixer.filter_fn.bias[...]

  def convolve(g, vx):
    c = g * group
    k = mixer.filter_fn.taps(h, t, channels=(c, group))
    u = jax.lax.dynamic_slice_in_dim(vx, c, group, axis=1)
    y = mixer.long_conv(u, k, jax.lax.dynamic_slice_in_dim(d_bias, c, group),
                        jax.lax.dynamic_slice_in_dim(gate, c, group, axis=1))
    return jax.lax.dynamic_update_slice_in_dim(vx, y, c, axis=1)

  y = jax.lax.fori_loop(0, d // group, convolve, vx)

  # 3. out_proj, the residual, norm2 and the MLP, chunk by chunk, into x.
  def finish(i, x):
    s = start_of(i)
    x_c = jax.lax.dynamic_slice_in_dim(x, s, chunk, axis=1)
    out = x_c + mixer.output(jax.lax.dynamic_slice_in_dim(y, s, chunk, axis=2)).astype(
        jnp.float32)
    flat = out.reshape(batch * chunk, d)
    flat = flat + block.mlp(block.norm2(flat).astype(dtype)).astype(jnp.float32)
    out = flat.reshape(batch, chunk, d)
    done = (s + rows < i * chunk)[None, :, None]  # rows an earlier chunk already finished
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.where(done, x_c, out), s, axis=1)

  return jax.lax.fori_loop(0, n_chunks, finish, x)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _embed(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state).embed(ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"), donate_argnums=(2,))
def _final_norm(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, *, chunk: int
                ) -> jax.Array:
  ln_f = nnx.merge(graphdef, state)
  length = x.shape[1]

  def norm(i, x):
    s = jnp.minimum(i * chunk, length - chunk)
    x_c = jax.lax.dynamic_slice_in_dim(x, s, chunk, axis=1)
    done = (s + jnp.arange(chunk) < i * chunk)[None, :, None]
    return jax.lax.dynamic_update_slice_in_dim(x, jnp.where(done, x_c, ln_f(x_c)), s, axis=1)

  return jax.lax.fori_loop(0, _chunk_starts(length, chunk), norm, x)


def hidden_states(model: nnx.Module, input_ids: jax.Array | np.ndarray, *,
                  layers: tuple[int, ...] = (), max_memory_gb: float | None = None,
                  sizes: Plan | None = None) -> tuple[jax.Array, dict[int, jax.Array]]:
  """`model.backbone(input_ids).hidden` [B, L, d] float32 (after ln_f) in bounded memory, and
  the residual stream after each block of `layers` (each [B, L, d], as `return_layers`).

  `model` is a HyenaLM or SequenceClassifier in eval mode (no dropout). `sizes` replaces the
  planned chunk and group (tests).
  """
  backbone = model.backbone
  cfg = backbone.config
  ids = jnp.asarray(input_ids)
  if ids.ndim != 2 or ids.shape[1] < 1:
    raise InputError(f"input_ids must be [batch, length] with length >= 1, got {ids.shape}")
  if ids.shape[1] > cfg.l_max:
    raise InputError(f"sequence length {ids.shape[1]:,} exceeds the model's l_max={cfg.l_max:,}")
  check_input_ids(ids, cfg)
  p = sizes or plan(cfg, ids.shape[0], ids.shape[1], max_memory_gb=max_memory_gb,
                    kept_layers=len(layers))
  embed_def, embed_state = nnx.split(backbone)
  x = _embed(embed_def, embed_state, ids)
  kept = {}
  graphdef = None
  for i, block in enumerate(backbone.layers):
    block_def, block_state = nnx.split(block)
    graphdef = graphdef or block_def  # every block has the same structure: one compilation
    x = _layer(graphdef, block_state, x, chunk=p.chunk, group=p.group)
    if i in layers:
      kept[i] = jnp.copy(x)
  norm_def, norm_state = nnx.split(backbone.ln_f)
  return _final_norm(norm_def, norm_state, x, chunk=p.chunk), kept


@functools.partial(jax.jit, static_argnames=("chunk",))
def _picked_log_probs(hidden: jax.Array, table: jax.Array, ids: jax.Array, *, chunk: int
                      ) -> jax.Array:
  """log p(ids[t] | ids[<t]) from hidden [B, L, d] and the tied head, chunk by chunk."""
  batch, length, _ = hidden.shape
  targets = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)  # position t predicts ids[t + 1]

  def pick(i, out):
    s = jnp.minimum(i * chunk, length - chunk)
    h = jax.lax.dynamic_slice_in_dim(hidden, s, chunk, axis=1)
    logits = jnp.einsum("bld,vd->blv", h, table, precision=jax.lax.Precision.HIGHEST)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jax.lax.dynamic_slice_in_dim(targets, s, chunk, axis=1)
    picked = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    return jax.lax.dynamic_update_slice_in_dim(out, picked, s, axis=1)

  out = jax.lax.fori_loop(0, _chunk_starts(length, chunk), pick,
                          jnp.zeros((batch, length), jnp.float32))
  # Entry t scores ids[t] given ids[<t]: shift right by one, entry 0 unscored (NaN).
  return jnp.concatenate([jnp.full((batch, 1), jnp.nan, jnp.float32), out[:, :-1]], axis=1)


def token_log_probs(model: nnx.Module, input_ids: jax.Array | np.ndarray, *,
                    max_memory_gb: float | None = None, sizes: Plan | None = None) -> jax.Array:
  """[B, L] float32: entry t = log p(ids[t] | ids[<t]), entry 0 NaN (as `score`), in bounded
  memory. `model` is a HyenaLM."""
  hidden, _ = hidden_states(model, input_ids, max_memory_gb=max_memory_gb, sizes=sizes)
  table = model.backbone.word_embeddings.embedding[...].astype(jnp.float32)
  chunk = min(hidden.shape[1], 8192)
  return _picked_log_probs(hidden, table, jnp.asarray(input_ids), chunk=chunk)


def last_logits(model: nnx.Module, input_ids: jax.Array | np.ndarray, *,
                max_memory_gb: float | None = None) -> jax.Array:
  """Next-token logits [B, V] float32 at the last position, in bounded memory."""
  hidden, _ = hidden_states(model, input_ids, max_memory_gb=max_memory_gb)
  return model.logits_from_hidden(hidden[:, -1])


def estimate_gb(cfg: HyenaConfig, batch: int, length: int) -> float:
  """The plan's estimated peak for [batch, length] (no budget), in GiB."""
  return plan(cfg, batch, length, max_memory_gb=math.inf).bytes / GIB
