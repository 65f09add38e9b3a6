"""Context (sequence) parallelism: one sequence sharded along its length across devices.

Layout (N = size of the `sequence` mesh axis, c = Lp / N positions per device):

    ids [B, L] -> embed (+ dropout) -> pad on the right to Lp = N * c -> x [B, Lp, d],
    sharded [B / data, Lp / N, d]; then, per device inside `jax.shard_map`, the model's own
    blocks (`model.Block.apply`, `Backbone.encode`) with the mixer's stages (hyena.py) composed
    by `_mixer`:
      norm1, in_proj, MLP, norm2, gating, out_proj   position-wise on the local [b, c, .] slice
      short depthwise conv                           2-position halo from the previous shard
                                                     (`ppermute`; shard 0 receives zeros = causal)
      long convolution                               all-to-all [b, d, c] -> [b, d / N, Lp]: whole
                                                     sequences of d / N channels, the conv_impl
                                                     dispatch (`HyenaOperator.long_conv`) locally,
                                                     all-to-all back to [b, d, c]
      implicit filter                                each shard builds the taps of its own
                                                     positions [d, c] and the same all-to-all
                                                     turns them into [d / N, Lp] (computed once
                                                     per layer, channel-sharded to match)
    ln_f and the tied LM head stay position-wise; the loss sums reduce with `psum`.

This is the design of StripedHyena 2 / Savanna (SPEC section 12). Communication per layer and
direction: three all-to-alls (v x1 [b, d, c] and the filter [d, c] in, the float32 convolution
out) and one ppermute of 2 positions of [b, 3d]. No device ever holds more than 1/N of an
activation: full length, but only d / N channels, inside the long convolution.

Padding: any length works. The sequence is padded on the right (zeros after the embedding) to a
multiple of N (and to at least 2 positions per shard, the short filter's halo). Every operation
is causal or position-wise, so right padding never changes an earlier output; padded outputs are
sliced off (`forward`) or given zero weight (`lm_loss`). Filter taps at padded positions
(>= L, possibly >= l_max) are set to zero: they only ever reach padded outputs. jax arrays shard
only evenly, so with such a length the token ids arrive unsplit ([B, L] int32, small) and
`forward`'s unpadded logits come back gathered; lengths divisible by N avoid both.

Composing with other mesh axes: the batch dimension is sharded over `batch_axes` (e.g.
("data",) or ("data", "fsdp")); activations are replicated over any other axis. Parameters enter
the shard_map replicated, so parameters stored sharded over an FSDP axis are all-gathered on the
way in (parameter-sized, never activation-sized) and their gradients reduced on the way out.
The mesh's axes should be `AxisType.Auto`, as `sharding.make_mesh(data, fsdp, sequence)` builds.

Limits: `d_model` must be divisible by N (channels are what the long convolution shards).
`conv_impl` is honoured: "pallas" runs the kernel on each device's full-length channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyena_jax.model import mesh_axes
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyena import HyenaFilter, HyenaOperator
from hyena_jax.model.hyenadna import Backbone, HyenaLM
from hyena_jax.training import memory, sharding

SEQ_AXIS = mesh_axes.SEQUENCE_AXIS    # the mesh axis that splits the length
BATCH_AXES = sharding.BATCH_AXES      # ("data", "fsdp")


def padded_length(length: int, n_shards: int) -> int:
  """Lp: `length` rounded up to a multiple of n_shards, with at least 2 positions per shard."""
  return max(-(-length // n_shards), 2) * n_shards


@dataclasses.dataclass(frozen=True)
class _Shard:
  """What the per-device code needs to know about the sequence split (all static)."""
  axis: str     # name of the sequence mesh axis
  n: int        # its size
  chunk: int    # positions per device, c = Lp / n
  length: int   # true sequence length L (positions >= L are padding)
  batch_axes: tuple[str, ...] = ()  # mesh axes the batch is split over


def _specs(mesh: jax.sharding.Mesh, batch: int, d_model: int, seq_axis: str,
           batch_axes: Sequence[str]) -> tuple[Any, int]:
  """Checks the mesh against the problem; returns (batch partition entry, sequence axis size)."""
  names = mesh.axis_names
  if seq_axis not in names:
    raise ValueError(f"mesh axes {names} have no sequence axis {seq_axis!r}; build the mesh with "
                     f"it (size 1 turns context parallelism off) or pass seq_axis=")
  for a in batch_axes:
    if a not in names or a == seq_axis:
      raise ValueError(f"batch axis {a!r} must be a mesh axis other than {seq_axis!r}; mesh axes "
                       f"are {names}")
  n = mesh.shape[seq_axis]
  if d_model % n:
    raise ValueError(f"d_model={d_model} is not divisible by the sequence axis size {n}: the long "
                     "convolution shards channels across it; choose a sequence axis size that "
                     "divides d_model")
  n_batch = math.prod(mesh.shape[a] for a in batch_axes)
  if batch % n_batch:
    raise ValueError(f"batch {batch} is not divisible by {n_batch} = size of batch axes "
                     f"{tuple(batch_axes)}; change the batch or the mesh")
  return (tuple(batch_axes) if batch_axes else None), n


def _constrain(x: jax.Array, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _unpad(out: jax.Array, length: int, unpad: bool) -> jax.Array:
  """[B, Lp, ...] -> [B, L, ...] when `unpad`.

  A jax.Array cannot be sharded unevenly, so when Lp != L the sliced result is no longer
  sequence-sharded: XLA gathers it along the length. Callers that must never hold a full-length
  array pass unpad=False and drop the padding shard by shard.
  """
  return out[:, :length] if unpad and out.shape[1] != length else out


# ------------------------------------------------------------------ per-device code (shard_map)

def _halo(tail: jax.Array, sh: _Shard) -> jax.Array | None:
  """tail: this shard's last positions [b, C, width] -> the previous shard's; zeros on shard 0."""
  if sh.n == 1:
    return None  # ShortFilter pads with zeros: the start of the sequence
  return jax.lax.ppermute(tail, sh.axis, [(i, i + 1) for i in range(sh.n - 1)])


def _to_channels(x: jax.Array, sh: _Shard) -> jax.Array:
  """[..., d, c] sequence-sharded -> [..., d / N, Lp] channel-sharded (one all-to-all).

  The all-to-all itself exchanges whole [..., d / N, c] blocks along a new major axis, and the
  received blocks are laid along the length by a local transpose: an all-to-all that splits or
  concatenates the minor (length) axis is emitted by libtpu as code that grows with the length
  (one f32 [32, Lp] -> [256, c] exchange on v5p-16: 1.5 GB of compile-host memory and 34 s at
  131k tokens, 3.5 GB and 153 s at 524k; this form: 0.8 GB and 1 s at any length; issue 24).
  """
  *lead, d, c = x.shape
  blocks = x.reshape(*lead, sh.n, d // sh.n, c)                     # [..., N, d / N, c]
  blocks = jax.lax.all_to_all(blocks, sh.axis, x.ndim - 2, x.ndim - 2, tiled=True)
  # blocks[..., i, :, :] now holds shard i's positions of this device's channels.
  return jnp.moveaxis(blocks, -3, -2).reshape(*lead, d // sh.n, sh.n * c)


def _to_positions(x: jax.Array, sh: _Shard) -> jax.Array:
  """[..., d / N, Lp] channel-sharded -> [..., d, c] sequence-sharded (one all-to-all; the
  inverse of `_to_channels`, exchanging blocks along a major axis for the same reason)."""
  *lead, d_local, lp = x.shape
  blocks = jnp.moveaxis(x.reshape(*lead, d_local, sh.n, lp // sh.n), -2, -3)  # [..., N, d/N, c]
  blocks = jax.lax.all_to_all(blocks, sh.axis, x.ndim - 2, x.ndim - 2, tiled=True)
  # blocks[..., i, :, :] now holds channel group i at this device's positions.
  return blocks.reshape(*lead, sh.n * d_local, lp // sh.n)


def _filter_channels(filter_fn: HyenaFilter, sh: _Shard) -> jax.Array:
  """This device's channels of the implicit filter over the whole (padded) length: [d / N, Lp].

  Each shard evaluates the filter MLP only at its own c positions, so the layer's filter is
  computed once across the mesh; the all-to-all then hands every device its channels.
  """
  start = jax.lax.axis_index(sh.axis) * sh.chunk
  # Mark the filter as varying over the batch axes from its very first op, so that in the
  # backward pass the sum of its gradient over batch shards happens on the (small) filter-MLP
  # parameters instead of on the channel-sharded spectrum [d / N, Lp / 2 + 1] (complex).
  start = jax.lax.pcast(start, tuple(sh.batch_axes), to="varying")
  k = filter_fn(sh.chunk, start=start)                              # [d, c] float32
  positions = start + jnp.arange(sh.chunk)
  k = jnp.where(positions[None, :] < sh.length, k, 0.0)            # taps >= L only reach padding
  return _to_channels(k, sh)


def _mixer(mixer: HyenaOperator, u: jax.Array, sh: _Shard) -> tuple[jax.Array, None]:
  """The mixer's stages on a sequence shard (a `model.Mix`). u: [b, c, d] -> [b, c, d]."""
  x0, x1, v, _ = mixer.project(u, halo=lambda tail: _halo(tail, sh))
  k = _filter_channels(mixer.filter_fn, sh)                         # [d / N, Lp]
  d_local = mixer.d_model // sh.n
  d_bias = jax.lax.dynamic_slice_in_dim(mixer.filter_fn.bias[...],
                                        jax.lax.axis_index(sh.axis) * d_local, d_local)
  # float32 in, so the convolution comes back (and travels) unrounded: with the gate applied by
  # `output` in float32 this is exactly the unsharded op's long_conv(vx, k, D, gate=x0).
  y = mixer.long_conv(_to_channels(v * x1, sh).astype(jnp.float32), k, d_bias)  # [b, d / N, Lp]
  return mixer.output(_to_positions(y, sh), gate=x0), None


def _backbone(backbone: Backbone, x: jax.Array, sh: _Shard) -> jax.Array:
  """Blocks and ln_f on a shard (the embedding is done outside): [b, c, d] -> [b, c, d]."""
  return backbone.encode(x, mix=functools.partial(_mixer, sh=sh)).hidden


# ------------------------------------------------------------------ public API

def _run(model: nnx.Module, backbone_of, input_ids: jax.Array, mesh: jax.sharding.Mesh,
         seq_axis: str, batch_axes: Sequence[str], head, extra: tuple = (),
         out_specs: Any = None, dropout_key: jax.Array | None = None) -> Any:
  """Embeds outside, pads, then runs blocks + `head` per device inside `jax.shard_map`.

  `head(model, hidden [b, c, d], *extra_local, sh)` turns the local final hidden state into the
  local outputs, described by `out_specs`.
  """
  backbone = backbone_of(model)
  cfg = backbone.config
  batch, length = input_ids.shape
  bspec, n = _specs(mesh, batch, cfg.d_model, seq_axis, batch_axes)
  lp = padded_length(length, n)
  sh = _Shard(axis=seq_axis, n=n, chunk=lp // n, length=length, batch_axes=tuple(batch_axes))
  # Embedding (and its dropout) run outside the shard_map on the unpadded ids, so a training run
  # draws exactly the dropout mask of the unsharded model (threefry bits do not depend on sharding).
  x = backbone.embed(input_ids, dropout_key)                        # [B, L, d] float32
  x = _constrain(jnp.pad(x, ((0, 0), (0, lp - length), (0, 0))), mesh, P(bspec, seq_axis, None))
  graphdef, state = nnx.split(model)

  def body(state, x, *extra_local):
    local = nnx.merge(graphdef, state)
    return head(local, _backbone(backbone_of(local), x, sh), *extra_local, sh)

  specs = (P(), P(bspec, seq_axis, None)) + tuple(
      P(bspec, seq_axis, *([None] * (e.ndim - 2))) for e in extra)
  fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=out_specs)
  return fn(state, x, *extra)


def forward(model: HyenaLM, input_ids: jax.Array, mesh: jax.sharding.Mesh, *,
            seq_axis: str = SEQ_AXIS, batch_axes: Sequence[str] = BATCH_AXES,
            unpad: bool = True, dropout_key: jax.Array | None = None) -> jax.Array:
  """Context-parallel `model(input_ids)`: ids [B, L] -> next-token logits [B, L, V] float32.

  Equal to the unsharded forward up to FFT round-off. Works eagerly or under `jax.jit`. The
  result is sharded [B / batch axes, L / sequence, V] when the sequence axis size N divides L.
  Otherwise jax cannot shard length L evenly: with unpad=True the logits are gathered along the
  length before slicing; unpad=False returns the padded, still sharded [B, Lp, V] (positions >= L
  are meaningless) for the caller to slice where it is cheap.
  """
  def head(local, hidden, sh):
    return local.logits_from_hidden(hidden)
  bspec = tuple(batch_axes) or None
  out = _run(model, lambda m: m.backbone, input_ids, mesh, seq_axis, batch_axes, head,
             out_specs=P(bspec, seq_axis, None), dropout_key=dropout_key)
  return _unpad(out, input_ids.shape[1], unpad)


def lm_loss(model: HyenaLM, input_ids: jax.Array, targets: jax.Array, mesh: jax.sharding.Mesh,
            *, weights: jax.Array | None = None, seq_axis: str = SEQ_AXIS,
            batch_axes: Sequence[str] = BATCH_AXES, dropout_key: jax.Array | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token cross-entropy, computed per device and reduced over batch and sequence.

  input_ids, targets: [B, L] ints; weights: optional [B, L] (0 drops a position, e.g. PAD when
  training with ignore_index). Returns (loss, metrics) with metrics {"loss", "accuracy",
  "tokens"} (weighted sums divided by the total weight; tokens = total weight), all replicated
  scalars. Differentiate with `nnx.value_and_grad(..., has_aux=True)`. `dropout_key` is passed
  to the embedding dropout exactly as `HyenaLM.__call__` does, so masks equal the unsharded ones.
  """
  if targets.shape != input_ids.shape:
    raise ValueError(f"targets {targets.shape} must have the shape of input_ids {input_ids.shape}")
  batch, length = input_ids.shape
  w = jnp.ones((batch, length), jnp.float32) if weights is None else weights.astype(jnp.float32)
  if w.shape != input_ids.shape:
    raise ValueError(f"weights {w.shape} must have the shape of input_ids {input_ids.shape}")
  n = mesh.shape[seq_axis] if seq_axis in mesh.axis_names else 1
  pad = ((0, 0), (0, padded_length(length, n) - length))
  targets = jnp.pad(targets.astype(jnp.int32), pad)
  w = jnp.pad(w, pad)                                               # padded positions weigh 0
  axes = tuple(batch_axes) + (seq_axis,)

  def head(local, hidden, tgt, wt, sh):
    logits = local.logits_from_hidden(hidden)                       # [b, c, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    hit = (jnp.argmax(logits, axis=-1) == tgt).astype(jnp.float32)
    sums = jnp.stack([(wt * nll).sum(), (wt * hit).sum(), wt.sum()])
    return jax.lax.psum(sums, axes)

  sums = _run(model, lambda m: m.backbone, input_ids, mesh, seq_axis, batch_axes, head,
              extra=(targets, w), out_specs=P(), dropout_key=dropout_key)
  total = sums[2]
  loss = sums[0] / total
  return loss, {"loss": loss, "accuracy": sums[1] / total, "tokens": total}


# ------------------------------------------------------------------ ahead-of-time memory report

def plan_memory(model_cfg: HyenaConfig, *, seq_len: int, batch: int, data: int = 1,
                fsdp: int = 1, sequence: int = 1, dtype: str | None = None,
                remat: str | None = None, train: bool = True,
                return_compiled: bool = False) -> dict[str, Any]:
  """Per-device memory XLA plans for a context-parallel step, without allocating anything.

  Lowers `lm_loss` (and its parameter gradient when `train`) on abstract inputs
  (`jax.ShapeDtypeStruct`) for `batch` sequences of `seq_len` tokens on the first
  data * fsdp * sequence local devices arranged as `sharding.make_mesh(data, fsdp, sequence)`,
  with parameters sharded by `sharding.tree_shardings` (FSDP), compiles it for the local backend
  and returns `memory.memory_report` of it (bytes per device; `peak_bytes` must fit on one
  device). `dtype` and
  `remat` override the config's; `l_max` is raised to `seq_len` when smaller. The optimizer
  state (2 x parameters for AdamW) is not included: Hyena's parameters are small next to
  long-context activations. `return_compiled` adds the compiled step (arguments: params, other
  state, ids) and the config it was built for.

  On fake CPU devices the plan is the CPU compiler's: the scaling with devices (1/N) is
  meaningful, the absolute numbers are not a GPU/TPU plan. In particular the CPU plan grows
  linearly with n_layer whether or not `remat` is on (measured: d_model 256, 8192 positions per
  device, about 245 MiB per layer either way, for this module and the unsharded model alike).
  """
  changes = {"l_max": max(model_cfg.l_max, seq_len)}
  if dtype is not None:
    changes["dtype"] = dtype
  if remat is not None:
    changes["remat"] = remat
  cfg = model_cfg.replace(**changes)
  n_devices = data * fsdp * sequence
  if n_devices > jax.device_count():
    raise ValueError(f"mesh data={data} x fsdp={fsdp} x sequence={sequence} needs {n_devices} "
                     f"devices, {jax.device_count()} exist; on CPU set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={n_devices} before importing jax")
  mesh = sharding.make_mesh(data, fsdp, sequence, devices=jax.devices()[:n_devices])
  abstract = nnx.eval_shape(lambda: HyenaLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  bspec, _ = _specs(mesh, batch, cfg.d_model, SEQ_AXIS, BATCH_AXES)
  key = jax.random.key(0) if train else None  # dropout on, as in training

  def loss_of(params, rest, ids):
    model = nnx.merge(graphdef, params, rest)
    if not train:
      model.eval()
    return lm_loss(model, ids, ids, mesh, dropout_key=key)[0]

  step = jax.value_and_grad(loss_of) if train else loss_of
  with_sharding = lambda tree, shardings: jax.tree.map(  # noqa: E731
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
  params = with_sharding(params, sharding.tree_shardings(params, mesh))
  rest = with_sharding(rest, jax.tree.map(lambda _: sharding.replicated(mesh), rest))
  # jax shards only evenly: ids of a length the sequence axis does not divide arrive unsplit.
  ids_spec = P(bspec, SEQ_AXIS) if seq_len % sequence == 0 else P(bspec)
  ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=NamedSharding(mesh, ids_spec))
  compiled = jax.jit(step).lower(params, rest, ids).compile()
  report = {
      "seq_len": seq_len, "batch": batch, "mesh": {"data": data, "fsdp": fsdp,
                                                   "sequence": sequence},
      "dtype": cfg.dtype, "remat": cfg.remat, "train": train, "backend": jax.default_backend(),
      **memory.memory_report(compiled),
  }
  if return_compiled:  # for benchmarks that also run the step
    report["compiled"], report["config"] = compiled, cfg
  return report


_COLLECTIVE = re.compile(r"\s(all-to-all|all-gather|all-reduce|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(")


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
  """(op, [(dtype, shape), ...]) of every cross-device collective in compiled HLO text.

  For checks such as "no all-gather of a full-length activation". A tuple-shaped collective
  (CPU splits an all-to-all into one operand per peer) lists all its elements.
  """
  found = []
  for line in hlo_text.splitlines():
    _, eq, rhs = line.partition(" = ")
    m = _COLLECTIVE.search(rhs) if eq else None
    if m:
      shapes = [(dtype, tuple(int(v) for v in dims.split(",") if v))
                for dtype, dims in re.findall(r"([a-z][a-z0-9]*)\[([0-9,]*)\]", rhs[:m.start()])]
      found.append((m.group(1), shapes))
  return found
