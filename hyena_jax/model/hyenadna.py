"""HyenaDNA language model and sequence classifier in Flax NNX.

Data flow (shapes with B batch, L length <= l_max, d d_model, V padded vocab = 16):

    ids [B, L] -> word_embeddings -> x [B, L, d] (float32 residual stream)
    for each block: x += mixer(norm1(x)); x += mlp(norm2(x))
    hidden = ln_f(x) [B, L, d];  logits = hidden @ E^T [B, L, V]   (LM head tied to E)

The block (norm1, mixer, residual, norm2, MLP) is `Block.apply`, the one copy: context
parallelism (training/context_parallel.py) and cached decoding (inference/generate.py) call it
with their own composition of the mixer's stages (hyena.py), so neither repeats the block or
the mixer.

Mixed precision: `config.dtype` is the compute dtype of projections and the MLP; LayerNorms, the
residual stream (upstream `residual_in_fp32`), the implicit filter and the FFT stay float32.
The float32 matmuls whose accuracy matters (implicit-filter MLP, tied LM head) run at
`Precision.HIGHEST` (on TPU the default float32 matmul is a single bfloat16 pass).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hyena_jax.data import tokenizer as tok
from hyena_jax.errors import InputError
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyena import HyenaOperator

Pooling = Literal["mean", "mean_nonpad", "last", "first", "sum"]
# How a caller runs the mixer inside `Block.apply`: (mixer, u [B, L, d]) -> (y [B, L, d], aux).
Mix = Callable[[HyenaOperator, jax.Array], tuple[jax.Array, Any]]
_normal = nnx.initializers.normal


def _layer_norm(d: int, cfg: HyenaConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(d, epsilon=cfg.layer_norm_epsilon, dtype=jnp.float32, rngs=rngs)


class Mlp(nnx.Module):
  """fc1 (d -> d_inner) -> GELU (tanh approximation, as upstream) -> fc2 (d_inner -> d)."""

  def __init__(self, cfg: HyenaConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.fc1 = nnx.Linear(cfg.d_model, cfg.d_inner, dtype=dtype, rngs=rngs,
                          kernel_init=_normal(cfg.initializer_range))
    self.fc2 = nnx.Linear(cfg.d_inner, cfg.d_model, dtype=dtype, rngs=rngs,
                          kernel_init=_normal(cfg.initializer_range / math.sqrt(2 * cfg.n_layer)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [N, d] -> [N, d]."""
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm1(x)), then + mlp(norm2(x))."""

  def __init__(self, cfg: HyenaConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(cfg.dtype)
    self.norm1 = _layer_norm(cfg.d_model, cfg, rngs)
    self.mixer = HyenaOperator(
        cfg.d_model, l_max=cfg.l_max, n_layer=cfg.n_layer, emb_dim=cfg.emb_dim,
        filter_order=cfg.filter_order, num_inner_mlps=cfg.num_inner_mlps,
        activation_freq=cfg.activation_freq, shift=cfg.shift, modulate=cfg.modulate,
        initializer_range=cfg.initializer_range, dtype=self.dtype, conv_impl=cfg.conv_impl,
        pallas_spectra_dtype=cfg.pallas_spectra_dtype, rngs=rngs)
    self.norm2 = _layer_norm(cfg.d_model, cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def apply(self, x: jax.Array, mix: Mix | None = None) -> tuple[jax.Array, Any]:
    """x: [B, L, d] float32 residual stream -> (same, what `mix` returned beside its output).

    `mix(mixer, u)` -> (y, aux) runs the mixer on u = norm1(x) [B, L, d] (compute dtype); None is
    the plain `mixer(u)`. Context parallelism and decoding pass their own composition of the
    mixer's stages; everything else in the block is this one code path.
    """
    batch, length, d = x.shape
    u = self.norm1(x).astype(self.dtype)
    y, aux = mix(self.mixer, u) if mix is not None else (self.mixer(u), None)
    x = x + y.astype(jnp.float32)
    flat = x.reshape(batch * length, d)  # position-wise work on 2-D arrays (fast backward on CPU)
    flat = flat + self.mlp(self.norm2(flat).astype(self.dtype)).astype(jnp.float32)
    return flat.reshape(batch, length, d), aux

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, d] float32 residual stream -> same."""
    return self.apply(x)[0]


_REMAT_POLICIES = {
    "block": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # As "block", with each block's input (the float32 residual stream the backward restarts
    # from: 1 GiB per layer at 1M tokens, d 256) kept in the host's pinned memory instead of HBM.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["block_input"],
        offload_src="device", offload_dst="pinned_host"),
}


# The largest block input offloaded as one buffer. libtpu (0.0.42.1) aborts compiling a host
# offload of a larger one inside the layer scan (a negative loop trip count in its strided host
# DMA, `LloLoop::trip_count`; seen at 4M tokens, 4 GiB per layer), so longer sequences offload
# their block input in channel slices of at most this size.
_OFFLOAD_PIECE_BYTES = 2 ** 30


def _named_block_input(h: jax.Array, offloaded: bool = True) -> jax.Array:
  """h: [B, L, d] named "block_input" (what remat="offload" sends to the host); when `offloaded`,
  in channel slices of at most `_OFFLOAD_PIECE_BYTES` per sequence. Slices along d, not L or B,
  so that batch and sequence sharding are untouched; the concatenation is exact."""
  per_sequence = h.shape[1] * h.shape[2] * h.dtype.itemsize
  pieces = min(h.shape[2], -(-per_sequence // _OFFLOAD_PIECE_BYTES)) if offloaded else 1
  if pieces == 1:
    return checkpoint_name(h, "block_input")
  parts = jnp.array_split(h, pieces, axis=2)
  return jnp.concatenate([checkpoint_name(part, "block_input") for part in parts], axis=2)


@dataclasses.dataclass
class BackboneOutput:
  hidden: jax.Array                  # [B, L, d] after ln_f
  layers: tuple[jax.Array, ...]      # residual stream after each block, each [B, L, d]


class Backbone(nnx.Module):
  """Embedding, blocks and final norm (upstream `backbone`)."""

  def __init__(self, cfg: HyenaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.word_embeddings = nnx.Embed(cfg.padded_vocab_size, cfg.d_model, rngs=rngs,
                                     embedding_init=_normal(cfg.initializer_range))
    # No RNG stream of its own: training passes `dropout_key`, so the model holds only Params.
    self.embed_dropout = nnx.Dropout(cfg.embed_dropout)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
    self.ln_f = _layer_norm(cfg.d_model, cfg, rngs)

  def embed(self, input_ids: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
    """input_ids: [B, L] -> [B, L, d] float32 (after embedding dropout in training mode).

    In training mode `dropout_key` is required: masks are a pure function of the key (train
    steps derive it from the step number, so a resumed run draws the same masks).
    """
    check_input_ids(input_ids, self.config)
    return self.embed_dropout(self.word_embeddings(input_ids).astype(jnp.float32),
                              rngs=dropout_key)

  def __call__(self, input_ids: jax.Array, *, embeddings: jax.Array | None = None,
               return_layers: bool = False, dropout_key: jax.Array | None = None
               ) -> BackboneOutput:
    """input_ids: [B, L] ints, or `embeddings` [B, L, d] (e.g. with soft prompts prepended)."""
    if embeddings is None:
      x = self.embed(input_ids, dropout_key)
    else:
      x = embeddings.astype(jnp.float32)
    if x.shape[1] < 1:
      raise InputError(f"embeddings {tuple(x.shape)} hold no positions (length 0)")
    if x.shape[1] > self.config.l_max:
      raise ValueError(f"sequence length {x.shape[1]} exceeds l_max={self.config.l_max}")
    return self.encode(x, return_layers=return_layers)

  def encode(self, x: jax.Array, *, mix: Mix | None = None, return_layers: bool = False
             ) -> BackboneOutput:
    """Blocks and ln_f on embeddings x [B, L, d] float32 (remat and scan as configured).

    `mix` is passed to every `Block.apply` (context parallelism's sharded mixer).
    """
    x, layers = run_blocks(self.layers, x, lambda block, h: block.apply(h, mix)[0],
                           remat=self.config.remat, scan=self.config.scan_layers,
                           return_layers=return_layers)
    return BackboneOutput(hidden=self.ln_f(x), layers=tuple(layers))


def run_blocks(blocks: nnx.List, x: jax.Array, apply: Callable[[Block, jax.Array], jax.Array], *,
               remat: str, scan: bool, return_layers: bool = False
               ) -> tuple[jax.Array, list[jax.Array]]:
  """Applies `apply(block, x)` for each block, with remat per block and optionally as a scan.

  With `scan`, the blocks run as one `lax.scan` over their stacked parameters: XLA then plans
  memory for one block body instead of the whole unrolled stack, and with remat only the block
  inputs are kept for the backward pass (at 16k tokens, d 256, 4 layers: 0.75 GiB instead of
  2.6 GiB). Parameters stay per layer, so checkpoints and PyTorch layouts are unchanged; the
  stacking copies the (megabytes of) weights once per call. Returns (x, per-layer outputs).
  """
  policy = _REMAT_POLICIES.get(remat)
  if not scan:
    layers = []
    for block in blocks:
      if remat == "none":
        x = apply(block, x)
      else:
        x = nnx.remat(apply, policy=policy)(block, x)
      if return_layers:
        layers.append(x)
    return x, layers

  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])

  def body(h, layer_state):
    h = apply(nnx.merge(graphdef, layer_state), _named_block_input(h, remat == "offload"))
    return h, (h if return_layers else None)

  if remat != "none":
    body = jax.checkpoint(body, policy=policy)
  x, per_layer = jax.lax.scan(body, x, stacked)
  return x, (list(per_layer) if return_layers else [])


class HyenaLM(nnx.Module):
  """HyenaDNA causal language model (upstream `ConvLMHeadModel` / HF `HyenaDNAForCausalLM`)."""

  def __init__(self, cfg: HyenaConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.backbone = Backbone(cfg, rngs=rngs)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """hidden: [..., d] -> [..., V] float32; the head is the transposed embedding (tied).

    At Precision.HIGHEST: float32 logits, also where the default matmul is one bf16 pass (TPU).
    """
    table = self.backbone.word_embeddings.embedding[...]
    return jnp.einsum("...d,vd->...v", hidden.astype(jnp.float32), table.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)

  def __call__(self, input_ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """input_ids: [B, L] -> next-token logits [B, L, V] (float32)."""
    return self.logits_from_hidden(self.backbone(input_ids, dropout_key=dropout_key).hidden)


def pool(hidden: jax.Array, mode: Pooling, input_ids: jax.Array | None = None) -> jax.Array:
  """Pools [B, L, d] -> [B, d] as upstream's SequenceDecoder (mean includes left padding).

  "mean_nonpad" (not upstream) averages only the sequence's own positions, those whose token
  (input_ids [B, L]) is not [PAD]; on equal-length sets it equals "mean".
  """
  if mode == "mean":
    return hidden.mean(axis=1)
  if mode == "mean_nonpad":
    if input_ids is None:
      raise ValueError("pooling 'mean_nonpad' needs the input ids to find the [PAD] positions")
    own = (input_ids != tok.PAD)[..., None].astype(hidden.dtype)  # [B, L, 1]
    return (hidden * own).sum(axis=1) / jnp.maximum(own.sum(axis=1), 1.0)
  if mode == "sum":
    return hidden.sum(axis=1)
  if mode == "last":
    return hidden[:, -1]
  if mode == "first":
    return hidden[:, 0]
  raise ValueError(f"pooling must be one of {typing.get_args(Pooling)}, got {mode!r}")


class SequenceClassifier(nnx.Module):
  """Backbone + pooling + `output_transform` Linear(d, n_classes) (upstream `head`/`decoder.0`).

  n_classes = 1 gives a regression head.
  """

  def __init__(self, cfg: HyenaConfig, n_classes: int, *, pooling: Pooling = "mean",
               rngs: nnx.Rngs):
    if n_classes < 1:
      raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    pool(jnp.zeros((1, 1, 1)), pooling, jnp.zeros((1, 1), jnp.int32))  # validates `pooling` now rather than at first call
    self.config, self.n_classes, self.pooling = cfg, n_classes, pooling
    self.backbone = Backbone(cfg, rngs=rngs)
    bound = 1.0 / math.sqrt(cfg.d_model)  # PyTorch nn.Linear default init
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(  # noqa: E731
        key, shape, dtype, -bound, bound)
    self.output_transform = nnx.Linear(cfg.d_model, n_classes, kernel_init=uniform,
                                       bias_init=uniform, rngs=rngs)

  def __call__(self, input_ids: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """input_ids: [B, L] -> class logits [B, n_classes] (float32)."""
    return self.output_transform(self.features(input_ids, dropout_key=dropout_key))

  def features(self, input_ids: jax.Array, *, dropout_key: jax.Array | None = None
               ) -> jax.Array:
    """input_ids: [B, L] -> pooled final hidden states [B, d_model], the head's input."""
    hidden = self.backbone(input_ids, dropout_key=dropout_key).hidden
    return pool(hidden, self.pooling, input_ids)


def check_input_ids(input_ids: jax.Array, cfg: HyenaConfig) -> None:
  """Validates token ids at the model boundary: rank, dtype, length and (when concrete) range."""
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  if not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise TypeError(f"input_ids must be integers (token ids), got dtype {input_ids.dtype}; "
                    "tokenize DNA with hyena_jax.tokenizer.CharacterTokenizer")
  if input_ids.shape[1] < 1:
    raise InputError(f"input_ids {tuple(input_ids.shape)} hold no tokens (length 0); give at "
                     "least one token per sequence")
  if input_ids.shape[1] > cfg.l_max:
    raise ValueError(f"sequence length {input_ids.shape[1]} exceeds l_max={cfg.l_max}; use a "
                     "model with a larger l_max or split the sequence (nothing is truncated)")
  if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.padded_vocab_size:
      raise ValueError(f"token ids must lie in [0, {cfg.padded_vocab_size}), got [{lo}, {hi}]")


def copy_params(source: nnx.Module, target: nnx.Module,
                groups: tuple[str, ...] | None = None) -> nnx.Module:
  """Copies the parameters of `source` into `target` (in place; returns it): every top-level
  group, or only `groups` (e.g. ("backbone",) to put a pretrained backbone under a new head).

  The one way a model is rebuilt around existing weights: with other execution settings
  (`config.EXECUTION_FIELDS`), another head, or from an abstract `nnx.eval_shape` skeleton.
  """
  state = nnx.state(target, nnx.Param)
  params = nnx.to_pure_dict(state)
  source_params = nnx.to_pure_dict(nnx.state(source, nnx.Param))
  for group in groups or tuple(source_params):
    params[group] = source_params[group]
  nnx.replace_by_pure_dict(state, params)
  nnx.update(target, state)
  return target
