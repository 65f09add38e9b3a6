r"""Embeddings of DNA sequences: per sequence (pooled) or per position, from chosen layers.

(`python -m hyena_jax.embed` runs it from the command line.)

Layers: "final" is the last hidden state after ln_f (what heads read); an integer i is the
residual stream after block i (0-based, before ln_f; the -hf `output_hidden_states`).

Padding never leaks (see batching.py): by default each sequence is embedded exactly as if it
were alone, tokens = bases [+ SEP], and pooling runs over those tokens. `pad_to=N` instead
reproduces the official fine-tuning input (left-pad every sequence to N with [PAD]; SPEC 6.1):
the [PAD] tokens are then part of the input and change every output after them, by design, as
they do in the official classifier; "mean" averages all N positions like the official
SequenceDecoder and "mean_nonpad" only the sequence's own. Per-position outputs cover the
sequence's own tokens in both modes.

Output (.npz, streamed; `np.load(out)`):
  embeddings  float32 [N, n_layers, d] pooled, or [sum(lengths), n_layers, d] per position
              (sequence i = embeddings[offsets[i]:offsets[i+1]])
  names       [N] record names;  lengths [N] tokens per sequence;  offsets [N+1] (per position)
  layers      [n_layers] the layer names
With an .npy output, `embeddings` goes there (memory-mappable) and the rest beside it in
`<stem>.index.npz`.
"""

from __future__ import annotations

import functools
from typing import Iterable, Iterator, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyena_jax.data import seqfiles
from hyena_jax.data import tokenizer as tok
from hyena_jax.data.seqfiles import Record
from hyena_jax.errors import InputError
from hyena_jax.inference import batching as inference
from hyena_jax.inference import long_forward

EmbedPooling = Literal["mean", "mean_nonpad", "sum", "first", "last"]
POOLINGS = ("mean", "mean_nonpad", "sum", "first", "last")
Layer = int | str


def normalize_layers(layers: Sequence[Layer] | str, n_layer: int) -> tuple[Layer, ...]:
  """["final", "0", -1] -> ("final", 0, n_layer-1); refuses unknown names and bad indices."""
  if isinstance(layers, str):
    layers = [x for x in layers.split(",") if x.strip()]
  out: list[Layer] = []
  for layer in layers:
    if isinstance(layer, str) and layer.strip() == "final":
      out.append("final")
      continue
    try:
      i = int(layer)
    except (TypeError, ValueError):
      raise InputError(f"layer {layer!r}: use 'final' (after ln_f) or a block index "
                       f"0..{n_layer - 1} (residual stream after that block)") from None
    if not -n_layer <= i < n_layer:
      raise InputError(f"layer {i} does not exist: the model has {n_layer} blocks "
                       f"(0..{n_layer - 1})")
    out.append(i % n_layer)
  if not out:
    raise InputError("no layers chosen; e.g. layers=('final',)")
  return tuple(out)


@functools.partial(nnx.jit, static_argnames=("layers", "per_position"))
def _embed_batch(model: nnx.Module, ids: jax.Array, starts: jax.Array, lengths: jax.Array, *,
                 layers: tuple[Layer, ...], per_position: bool) -> jax.Array | dict:
  """ids [B, T] -> [B, T, n_layers, d] (per position) or {pooling: [B, n_layers, d]}.

  Positions [starts, lengths) are the sequence's own tokens; [0, starts) left padding that is
  part of the input (pad_to mode); [lengths, T) right padding that no kept output depends on.
  Every pooling is returned (they are cheap), so one compilation serves them all.
  """
  out = model.backbone(ids, return_layers=any(layer != "final" for layer in layers))
  h = jnp.stack([out.hidden if layer == "final" else out.layers[layer] for layer in layers], 2)
  return h if per_position else _pooled(h, starts, lengths)


def _embed_long(model: nnx.Module, ids: jax.Array, starts: jax.Array, lengths: jax.Array, *,
                layers: tuple[Layer, ...], per_position: bool,
                max_memory_gb: float | None = None) -> jax.Array | dict:
  """`_embed_batch` for long sequences, through the bounded-memory forward (long_forward.py)."""
  blocks = tuple(layer for layer in layers if layer != "final")
  hidden, kept = long_forward.hidden_states(model, ids, layers=blocks,
                                            max_memory_gb=max_memory_gb)
  outs = [hidden if layer == "final" else kept[layer] for layer in layers]
  if per_position:
    return jnp.stack(outs, 2)
  pooled = [_pooled_jit(h[:, :, None], starts, lengths) for h in outs]
  return {name: jnp.concatenate([p[name] for p in pooled], axis=1) for name in pooled[0]}


def _pooled(h: jax.Array, starts: jax.Array, lengths: jax.Array) -> dict:
  """Every pooling of h [B, T, n_layers, d] over each row's positions (see `_embed_batch`)."""
  pos = jnp.arange(h.shape[1])[None, :, None, None]
  end = lengths[:, None, None, None]
  upto_end = (pos < end).astype(h.dtype)                      # [0, lengths): incl. left pads
  own = upto_end * (pos >= starts[:, None, None, None])       # [starts, lengths)
  total = (h * upto_end).sum(axis=1)
  return {
      "sum": total,
      "mean": total / jnp.maximum(upto_end.sum(axis=1), 1.0),
      "mean_nonpad": (h * own).sum(axis=1) / jnp.maximum(own.sum(axis=1), 1.0),
      "first": h[:, 0],
      "last": jnp.take_along_axis(h, jnp.maximum(end - 1, 0), axis=1)[:, 0],
  }


_pooled_jit = jax.jit(_pooled)


def make_encoder(tokenizer: tok.CharacterTokenizer, l_max: int, *, add_eos: bool, truncate: bool,
                 pad_to: int | None):
  """record -> token ids: bases [+ SEP], or left-padded to `pad_to` (official fine-tuning)."""
  if pad_to is not None and not 1 <= pad_to <= l_max:
    raise InputError(f"pad_to={pad_to} must lie in 1..l_max={l_max}")

  def encode(record: Record) -> np.ndarray:
    if pad_to is None:
      return inference.encode_record(tokenizer, record, l_max, add_eos=add_eos, truncate=truncate)
    try:
      return tokenizer.encode(record.seq, pad_to, add_eos=add_eos, truncate=truncate,
                              where=record.where)
    except ValueError as e:
      raise InputError(f"{e} (pad_to={pad_to})") from None
  return encode


def embed_sequences(model: nnx.Module, sequences: Iterable[str | Record], *,
                    layers: Sequence[Layer] | str = ("final",), pooling: EmbedPooling = "mean",
                    per_position: bool = False, batch_size: int = 8, add_eos: bool = False,
                    truncate: bool = False, pad_to: int | None = None,
                    tokenizer: tok.CharacterTokenizer | None = None,
                    chunk_size: int | None = None, max_memory_gb: float | None = None
                    ) -> Iterator[tuple[Record, np.ndarray]]:
  """Streams (record, embedding) in input order; holds at most `chunk_size` records at a time.

  `model` is a HyenaLM or SequenceClassifier (only its backbone runs). Each embedding is float32
  [n_layers, d] (pooled) or [n_tokens, n_layers, d] (`per_position`). Sequences longer than
  the model's l_max (or `pad_to`) raise unless `truncate` keeps their first bases. Plain
  strings are named seq0, seq1, ... A batch that one jitted forward could not run within
  `max_memory_gb` (default: what the host has available) runs in bounded memory
  (long_forward.py).
  """
  cfg = model.config
  layers = normalize_layers(layers, cfg.n_layer)
  if pooling not in POOLINGS:
    raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
  encode = make_encoder(tokenizer or tok.CharacterTokenizer(), cfg.l_max, add_eos=add_eos,
                        truncate=truncate, pad_to=pad_to)

  def compute(batch: inference.Batch) -> list[np.ndarray]:
    starts = np.argmax(batch.ids != tok.PAD, axis=1).astype(np.int32)  # leading [PAD]s
    args = (model, jnp.asarray(batch.ids), jnp.asarray(starts), jnp.asarray(batch.lengths))
    if long_forward.wants_long_path(cfg, *batch.ids.shape, max_memory_gb):
      out = _embed_long(*args, layers=layers, per_position=per_position,
                        max_memory_gb=max_memory_gb)
    else:
      out = _embed_batch(*args, layers=layers, per_position=per_position)
    out = np.asarray(out if per_position else out[pooling])
    if not per_position:
      return [out[row] for row in range(len(batch.index))]
    return [out[row, starts[row]:batch.lengths[row]] for row in range(len(batch.index))]

  yield from inference.run_chunked(inference.as_records(sequences), encode, compute,
                                   batch_size=batch_size, l_max=cfg.l_max, chunk_size=chunk_size)


def embed(model: nnx.Module, sequences: Iterable[str | Record], **kwargs
          ) -> np.ndarray | list[np.ndarray]:
  """In-memory convenience over `embed_sequences` (same keyword arguments): a float32 array
  [N, n_layers, d] when pooled, or a list of [n_i, n_layers, d] with `per_position=True`."""
  results = [emb for _, emb in embed_sequences(model, sequences, **kwargs)]
  if not results:
    raise InputError("no sequences to embed")
  return results if kwargs.get("per_position") else np.stack(results)


def embed_file(model: nnx.Module, input_path: str, output_path: str, *, fmt: str = "auto",
               column: int | str = 0, name_column: int | str | None = None,
               layers: Sequence[Layer] | str = ("final",), pooling: EmbedPooling = "mean",
               per_position: bool = False, batch_size: int = 8, add_eos: bool = False,
               truncate: bool = False, pad_to: int | None = None,
               tokenizer: tok.CharacterTokenizer | None = None,
               max_memory_gb: float | None = None) -> dict:
  """Embeds every record of a FASTA/TSV file into `output_path` (.npz or .npy), streaming.

  A first pass tokenizes every record, so bad characters and overlong sequences fail with their
  file and line before any compute, and counts tokens to size the output. Returns a summary
  (records, tokens, shape, output paths). The output layout is in the module docstring.
  """
  inference.check_local_output(output_path)
  if not output_path.endswith((".npz", ".npy")):
    raise InputError(f"output must end with .npz or .npy, got {output_path}")
  cfg = model.config
  layers = normalize_layers(layers, cfg.n_layer)
  tokenizer = tokenizer or tok.CharacterTokenizer()
  encode = make_encoder(tokenizer, cfg.l_max, add_eos=add_eos, truncate=truncate, pad_to=pad_to)
  read = lambda: seqfiles.read_sequences(input_path, fmt=fmt, column=column,  # noqa: E731
                                          name_column=name_column)
  names, lengths = [], []
  for record in read():  # validation pass: tokenize only
    ids = encode(record)
    names.append(record.name)
    lengths.append(len(ids) - int(np.argmax(ids != tok.PAD)))
  if not names:
    raise InputError(f"{input_path}: no sequences found")
  lengths_arr = np.asarray(lengths, np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths_arr)])
  shape = (int(offsets[-1]) if per_position else len(names), len(layers), cfg.d_model)
  meta = {"names": np.asarray(names), "lengths": lengths_arr,
          "layers": np.asarray([str(x) for x in layers])}
  if per_position:
    meta["offsets"] = offsets
  stream = embed_sequences(model, read(), layers=layers, pooling=pooling,
                           per_position=per_position, batch_size=batch_size, add_eos=add_eos,
                           truncate=truncate, pad_to=pad_to, tokenizer=tokenizer,
                           max_memory_gb=max_memory_gb)
  stream = inference.with_progress(stream, len(names), "embed")
  rows = (emb if per_position else emb[None] for _, emb in stream)
  if output_path.endswith(".npz"):
    with inference.NpzStreamWriter(output_path) as writer:
      for key, value in meta.items():
        writer.add(key, value)
      writer.begin("embeddings", shape)
      for block in rows:
        writer.write(block)
    outputs = [output_path]
  else:
    index_path = output_path[:-4] + ".index.npz"
    array = np.lib.format.open_memmap(output_path, mode="w+", dtype=np.float32, shape=shape)
    row = 0
    for block in rows:
      array[row:row + len(block)] = block
      row += len(block)
    array.flush()
    del array
    np.savez(index_path, **meta)
    outputs = [output_path, index_path]
  return {"records": len(names), "tokens": int(offsets[-1]), "shape": shape, "outputs": outputs}
