"""What the inference tools (embed, score, generate) share: batching sequences without letting
padding leak, and writing ragged results incrementally.

Padding policy. HyenaDNA is causal: the output at position t depends on positions <= t only.
Left padding (the tokenizer's default) therefore changes every real position's output, since the
long convolution and the short filter see the [PAD] embeddings before the sequence. RIGHT padding
changes nothing at the real positions. `iter_batches` right-pads each sequence to a shared bucket
length (a few fixed sizes, so few compilations) and passes the true lengths along; everything that
reads outputs (pooling, per-base scores) looks only at positions < length. Results of a batch are
therefore those of each sequence run alone, up to FFT round-off (the FFT size follows the bucket).

Sequence inputs are read by `hyena_jax.data.seqfiles` (FASTA, tables, VCF), record by record; every
record carries `where` (file, line and name) for error messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zipfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from flax import nnx

from hyena_jax import storage
from hyena_jax.data import tokenizer as tok
from hyena_jax.data.seqfiles import Record
from hyena_jax.errors import InputError, MissingInputError
from hyena_jax.model.hyenadna import HyenaLM

# ------------------------------------------------------------------------------------------------
# Models


def require_lm(model: nnx.Module, tool: str) -> HyenaLM:
  """Scoring and generation need next-token logits: refuse a classifier with a clear reason."""
  if not isinstance(model, HyenaLM):
    raise InputError(f"{tool} needs a language model (HyenaLM); got a {type(model).__name__}. "
                     "A fine-tuned classifier's LM head is not trained for next-base prediction: "
                     "use a pretrained checkpoint (embeddings work with either)")
  return model


# ------------------------------------------------------------------------------------------------
# Records to token ids


def as_records(sequences: Iterable[str | Record]) -> Iterator[Record]:
  """Plain strings become records named seq0, seq1, ...; Records pass through."""
  for i, s in enumerate(sequences):
    yield s if isinstance(s, Record) else Record(f"seq{i}", s, f"sequence {i}")


def encode_record(tokenizer: tok.CharacterTokenizer, record: Record, l_max: int, *,
                  add_eos: bool = False, truncate: bool = False, prefix: Sequence[int] = ()
                  ) -> np.ndarray:
  """Token ids of one record ([prefix] + bases [+ SEP]), checked against l_max. int32 [n]."""
  room = l_max - len(prefix)
  if not record.seq:
    raise InputError(f"{record.where}: empty sequence (length 0); remove it or give at least "
                     "one base")
  ids = tokenizer.encode(record.seq, None, add_eos=False, where=record.where)
  if ids.size + add_eos > room:
    if not truncate:
      raise InputError(f"{record.where}: {ids.size} bases{' + [SEP]' if add_eos else ''} exceed "
                       f"the model's l_max={l_max}{' with the prefix token' if prefix else ''}; "
                       "pass truncate=True (--truncate) to keep the first bases, or split it")
    ids = ids[:room - add_eos]
  parts = [np.asarray(prefix, np.int32), ids] + ([np.array([tok.SEP], np.int32)] if add_eos else [])
  return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------
# Batching without padding leaks


def bucket_length(n: int, l_max: int, min_bucket: int = 64) -> int:
  """Padded length for a sequence of n tokens: the next power of two >= max(n, min_bucket),
  capped at l_max. Few distinct sizes means few compilations."""
  if not 1 <= n <= l_max:
    raise InputError(f"sequence of {n} tokens does not fit 1..l_max={l_max}")
  return min(max(min_bucket, 1 << (n - 1).bit_length()), l_max)


@dataclasses.dataclass
class Batch:
  ids: np.ndarray          # int32 [batch_size, T], right-padded with PAD
  lengths: np.ndarray      # int32 [batch_size]; 0 for filler rows
  index: list[int]         # position in the chunk of each real row (len <= batch_size)


def make_batches(items: Sequence[np.ndarray], batch_size: int, l_max: int,
                 min_bucket: int = 64) -> Iterator[Batch]:
  """Groups token arrays by bucket length and right-pads them; the batch axis is always
  `batch_size` (filler rows have length 0) so each bucket compiles once."""
  if batch_size < 1:
    raise InputError(f"batch_size must be >= 1, got {batch_size}")
  by_bucket: dict[int, list[int]] = {}
  for i, ids in enumerate(items):
    by_bucket.setdefault(bucket_length(len(ids), l_max, min_bucket), []).append(i)
  for length in sorted(by_bucket):
    members = by_bucket[length]
    for start in range(0, len(members), batch_size):
      index = members[start:start + batch_size]
      ids = np.full((batch_size, length), tok.PAD, np.int32)
      lengths = np.zeros(batch_size, np.int32)
      for row, i in enumerate(index):
        ids[row, :len(items[i])] = items[i]
        lengths[row] = len(items[i])
      yield Batch(ids, lengths, index)


def run_chunked(items: Iterable, encode: Callable[[object], np.ndarray],
                compute: Callable[[Batch], list], *, batch_size: int, l_max: int,
                chunk_size: int | None = None, min_bucket: int = 64) -> Iterator[tuple]:
  """Streams (item, result) in input order, holding at most `chunk_size` items at a time.

  `encode(item) -> ids`; `compute(batch) -> one result per real row`. Within a chunk, items are
  bucketed by length (see `make_batches`), so the order of computation differs from the input's
  but the output order does not.
  """
  chunk_size = chunk_size or 16 * batch_size
  chunk: list = []

  def flush():
    encoded = [encode(item) for item in chunk]
    results: list = [None] * len(chunk)
    for batch in make_batches(encoded, batch_size, l_max, min_bucket):
      for i, res in zip(batch.index, compute(batch)):
        results[i] = res
    yield from zip(chunk, results)

  for item in items:
    chunk.append(item)
    if len(chunk) == chunk_size:
      yield from flush()
      chunk = []
  if chunk:
    yield from flush()


# ------------------------------------------------------------------------------------------------
# Writing results incrementally


def with_progress(results: Iterable, total: int, desc: str) -> Iterable:
  """`results` (one item per record) behind a tqdm bar with rate and ETA when stderr is a
  terminal; unchanged in logs and pipes (tqdm's `disable=None`)."""
  from tqdm import tqdm
  return tqdm(results, total=total, desc=desc, unit="seq", disable=None, leave=False,
              dynamic_ncols=True)


def check_local_output(path: str) -> None:
  """Outputs are streamed into a local file (rows appended, .npy memory-mapped): a URL is
  refused before any compute."""
  storage.require_local(path, "--output", "outputs are streamed into a local file",
                        output=True)
  if os.path.isdir(path):
    raise InputError(f"--output {path} is a folder; name the file to write")
  storage.check_writable(path, "--output")


@contextlib.contextmanager
def atomic_text(path: str) -> Iterator:
  """A text file written beside `path` and renamed onto it on success; on any error it is removed,
  so a failed run leaves no partial output that looks complete."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class NpzStreamWriter:
  """Writes an .npz whose big array is streamed in row blocks, in order, never held whole.

  Small arrays are added with `add`; then `begin(name, shape, dtype)` opens the streamed entry
  (its shape must be known: count the records first), `write(rows)` appends rows, `close()`
  checks the count. `np.load(path)[name]` reads it back as usual.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(self.path))
    if not os.path.isdir(parent):
      raise MissingInputError(f"output folder does not exist: {parent}")
    self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
    self._stream = None
    self._rows_left = 0

  def add(self, name: str, array: np.ndarray) -> None:
    """Writes a whole (small) array; finishes a streamed entry first."""
    self._end_stream()
    with self._zip.open(f"{name}.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

  def begin(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> None:
    """Opens entry `name` of the given final shape; rows follow with `write`."""
    self._end_stream()
    self._stream = self._zip.open(f"{name}.npy", "w", force_zip64=True)
    self._name, self._dtype, self._shape = name, np.dtype(dtype), tuple(shape)
    header = {"descr": np.lib.format.dtype_to_descr(self._dtype), "fortran_order": False,
              "shape": self._shape}
    np.lib.format.write_array_header_2_0(self._stream, header)
    self._rows_left = shape[0]

  def write(self, rows: np.ndarray) -> None:
    """Appends rows [n, *shape[1:]] to the open entry, in order."""
    rows = np.ascontiguousarray(rows, dtype=self._dtype)
    if rows.shape[1:] != self._shape[1:] or rows.shape[0] > self._rows_left:
      raise InputError(f"rows of shape {rows.shape} do not fit the remaining "
                       f"{(self._rows_left,) + self._shape[1:]} of {self._name!r}")
    self._stream.write(rows.tobytes())
    self._rows_left -= rows.shape[0]

  def _end_stream(self) -> None:
    if self._stream is None:
      return
    self._stream.close()
    self._stream = None
    if self._rows_left:
      raise RuntimeError(f"{self.path}: {self._rows_left} rows of {self._name!r} never written")

  def close(self) -> None:
    try:
      self._end_stream()
    finally:
      self._zip.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.close()
    else:  # leave no half-written file that looks complete
      self._rows_left = 0
      self.close()
      os.remove(self.path)
