"""What the inference tools (embed, score, generate) share: loading a model, reading sequences,
batching them without letting padding leak, and writing ragged results incrementally.

Padding policy. HyenaDNA is causal: the output at position t depends on positions <= t only.
Left padding (the tokenizer's default) therefore changes every real position's output, since the
long convolution and the short filter see the [PAD] embeddings before the sequence. RIGHT padding
changes nothing at the real positions. `iter_batches` right-pads each sequence to a shared bucket
length (a few fixed sizes, so few compilations) and passes the true lengths along; everything that
reads outputs (pooling, per-base scores) looks only at positions < length. Results of a batch are
therefore those of each sequence run alone, up to FFT round-off (the FFT size follows the bucket).

Sequence inputs: FASTA (plain or gzip) and TSV/CSV (one sequence column) are streamed record by
record; every record carries `where` (file, line and name) for error messages.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import warnings
import zipfile
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from flax import nnx

from hyena_jax import genome
from hyena_jax import tokenizer as tok
from hyena_jax.config import HyenaConfig
from hyena_jax.errors import InputError, MissingInputError
from hyena_jax.model import HyenaLM, SequenceClassifier

_GZIP_MAGIC = b"\x1f\x8b"
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fa.gz", ".fasta.gz", ".fna.gz")
TABLE_SUFFIXES = (".tsv", ".csv", ".txt", ".tsv.gz", ".csv.gz", ".txt.gz")


# ------------------------------------------------------------------------------------------------
# Models


def load_model(path: str | os.PathLike, *, step: int | None = None, shift: float | None = None
               ) -> tuple[HyenaLM | SequenceClassifier, HyenaConfig]:
  """Deprecated: use `hyena_jax.load(path, step=..., shift=...)`. Returns (model, config)."""
  warnings.warn("inference.load_model is deprecated; use hyena_jax.load(path) (returns a Loaded "
                "with .model and .config)", DeprecationWarning, stacklevel=2)
  from hyena_jax import loading  # pylint: disable=g-import-not-at-top
  loaded = loading.load(path, step=step, shift=shift)
  return loaded.model, loaded.config


def require_lm(model: nnx.Module, tool: str) -> HyenaLM:
  """Scoring and generation need next-token logits: refuse a classifier with a clear reason."""
  if not isinstance(model, HyenaLM):
    raise InputError(f"{tool} needs a language model (HyenaLM); got a {type(model).__name__}. "
                     "A fine-tuned classifier's LM head is not trained for next-base prediction: "
                     "use a pretrained checkpoint (embeddings work with either)")
  return model


# ------------------------------------------------------------------------------------------------
# Reading sequences


@dataclasses.dataclass(frozen=True)
class Record:
  name: str
  seq: str
  where: str       # "file:line (name)" for error messages


def as_records(sequences: Iterable[str | Record]) -> Iterator[Record]:
  """Plain strings become records named seq0, seq1, ...; Records pass through."""
  for i, s in enumerate(sequences):
    yield s if isinstance(s, Record) else Record(f"seq{i}", s, f"sequence {i}")


def text_lines(path: str) -> Iterator[tuple[int, str]]:
  """(line number, line) of a plain or gzip text file (see `genome.text_lines`). latin-1, so a
  stray non-ASCII byte reaches the sequence checks, which name its position."""
  return genome.text_lines(path, encoding="latin-1")


def read_fasta(path: str | os.PathLike) -> Iterator[Record]:
  """Streams FASTA records (plain or gzip, any line width, CRLF ok). Name = header's first word.

  Errors name the file and line: text before the first header, a header without a name, a
  record without sequence, a name used twice, a binary file and a truncated gzip.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingInputError(f"FASTA file not found: {path}")
  name, header_line, parts = None, 0, []
  seen: dict[str, int] = {}

  def finish() -> Record:
    where = f"{path}:{header_line} (record {name!r})"
    if not parts:
      raise InputError(f"{where}: record has no sequence; remove it or add bases")
    return Record(name, "".join(parts), where)

  for lineno, line in text_lines(path):
    if line.startswith(">"):
      if name is not None:
        yield finish()
      words = line[1:].split()
      if not words:
        raise InputError(f"{path}:{lineno}: FASTA header without a name")
      name, header_line, parts = words[0], lineno, []
      if name in seen:  # results are keyed by name: a second record would shadow the first
        raise InputError(f"{path}:{lineno}: FASTA record name {name!r} is used again (first at "
                         f"line {seen[name]}); names must be unique")
      seen[name] = lineno
    elif line.strip():
      if name is None:
        raise InputError(f"{path}:{lineno}: text before the first '>' header; is this FASTA?")
      parts.append(line.strip())
  if name is not None:
    yield finish()


def read_table(path: str | os.PathLike, column: int | str = 0, *, name_column: int | str | None
               = None, header: bool | None = None) -> Iterator[Record]:
  """Streams sequences from one column of a TSV (or CSV, by suffix) file.

  `column`/`name_column` are 0-based indices or header names (a name implies a header).
  `header=None` applies the one header rule of every table reader (`genome.HEADER_NAMES`):
  line 1 is a header exactly when one of its fields is seq, sequence, name, id or label (any
  case); a first line that is neither DNA nor such a header is an error, never dropped.
  Records are named by `name_column`, else `row<N>` (N = 1-based data row). Errors name the
  file and line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingInputError(f"table file not found: {path}")
  delimiter = "," if path.endswith((".csv", ".csv.gz")) else "\t"
  named = isinstance(column, str) or isinstance(name_column, str)
  if header is False and named:
    raise InputError("columns given by name need a header row; pass indices or header=True")
  current = [0]  # line number of the row csv.reader last returned (one row per line)

  def texts() -> Iterator[str]:
    for lineno, line in text_lines(path):
      current[0] = lineno
      yield line

  rows = iter(csv.reader(texts(), delimiter=delimiter))
  first = next(rows, None)
  if first is None:
    return
  if header is None:
    header = named or genome.is_header_row(first)
    field = _field(first, _index(column, None), path, 1).strip()
    if not header and not _looks_like_dna(field):
      raise InputError(f"{path}:1: {field[:40]!r} is neither DNA nor a column name; a header row "
                       f"must name its columns (one of {', '.join(genome.HEADER_NAMES)}), or pass "
                       "the sequence column by name (--column=NAME)")
  names = first if header else None
  col = _index(column, names, path)
  name_col = None if name_column is None else _index(name_column, names, path)
  data_row = 0
  pending = [] if header else [first]
  for row in _chain(pending, rows):
    lineno = current[0]
    if not row or (len(row) == 1 and not row[0].strip()):
      continue  # blank line
    data_row += 1
    seq = _field(row, col, path, lineno).strip()
    name = _field(row, name_col, path, lineno) if name_col is not None else f"row{data_row}"
    where = f"{path}:{lineno} (record {name!r})"
    if not seq:
      raise InputError(f"{where}: empty sequence")
    yield Record(name, seq, where)


def _chain(first: list, rest: Iterable) -> Iterator:
  yield from first
  yield from rest


def _index(column: int | str, names: list[str] | None, path: str = "") -> int:
  if isinstance(column, int):
    return column
  if names is None:
    return 0
  if column not in names:
    raise InputError(f"{path}: no column named {column!r}; header has {names}")
  return names.index(column)


def _field(row: list[str], col: int, path: str, lineno: int) -> str:
  if col >= len(row):
    raise InputError(f"{path}:{lineno}: row has {len(row)} column(s), column {col} requested")
  return row[col]


_DNA = set("ACGTNacgtn" + tok.IUPAC_AMBIGUITY + tok.IUPAC_AMBIGUITY.lower())


def _looks_like_dna(text: str) -> bool:
  return bool(text) and set(text.strip()) <= _DNA


def read_sequences(path: str | os.PathLike, *, fmt: str = "auto", column: int | str = 0,
                   name_column: int | str | None = None) -> Iterator[Record]:
  """FASTA or table records, chosen by `fmt` ("fasta" | "table" | "auto": by file suffix)."""
  path = os.fspath(path)
  if fmt == "auto":
    low = path.lower()
    fmt = ("fasta" if low.endswith(FASTA_SUFFIXES) else
           "table" if low.endswith(TABLE_SUFFIXES) else "")
    if not fmt:
      raise InputError(f"cannot tell the format of {path} from its suffix; pass fmt='fasta' or "
                       f"'table' (FASTA: {FASTA_SUFFIXES}, tables: {TABLE_SUFFIXES})")
  if fmt == "fasta":
    return read_fasta(path)
  if fmt == "table":
    return read_table(path, column, name_column=name_column)
  raise InputError(f"fmt must be 'auto', 'fasta' or 'table', got {fmt!r}")


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


# ------------------------------------------------------------------------------------------------
# CLI pieces shared by embed, score and generate


def define_common_flags() -> None:
  """--model, --step, --revision, --batch_size, --shift (called by each CLI's define_flags)."""
  from absl import flags
  flags.DEFINE_string("model", None, "orbax run, official weights file or folder, or Hub repo "
                      "id ORG/NAME (see hyena_jax.load)")
  flags.DEFINE_integer("step", None, "orbax run: checkpoint step to read (default: latest)")
  flags.DEFINE_string("revision", None, "Hub repo id: branch, tag or commit (default: main)")
  flags.DEFINE_integer("batch_size", 8, "sequences per forward pass")
  flags.DEFINE_float("shift", None, "official weights: modulation shift (default 0.05)")


def model_from_flags() -> HyenaLM | SequenceClassifier:
  """`hyena_jax.load` of the common flags' model, logging where it came from."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  from hyena_jax import loading  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  loaded = loading.load(f.model, step=f.step, revision=f.revision, shift=f.shift)
  logging.info("model: %s", loaded.where)
  return loaded.model


def parse_column(value: str | None) -> int | str | None:
  """Table column flag: an integer index or a header name."""
  return None if value is None else int(value) if value.lstrip("-").isdigit() else value
