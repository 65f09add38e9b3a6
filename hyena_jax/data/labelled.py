"""Labelled sequence data for fine-tuning and in-context learning: a task's train/valid/test
splits read from TSV/CSV (`seq<TAB>label`) or FASTA + labels, encoded the official way (left-padded
with [PAD] to max_length, no [SEP]; SPEC 6.1), with seeded hold-outs where a file is missing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np

from hyena_jax.data import tokenizer as tok
from hyena_jax.data.seqfiles import (DNA_BASES, HEADER_NAMES, delimiter_of, is_header_row,
                                     read_fasta, table_rows, text_lines)
from hyena_jax.errors import InputError


def split_train_test(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded hold-out: (train_idx, test_idx), sorted int64 arrays partitioning range(n).

  The test size is round(n * test_fraction), at least 1 and at most n - 1.
  """
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
    raise InputError(f"n must be an int >= 2, got {n!r}")
  if not 0.0 < test_fraction < 1.0:
    raise InputError(f"test_fraction must lie in (0, 1), got {test_fraction}")
  n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_test:]), np.sort(perm[:n_test])


@dataclasses.dataclass
class LabelledSplit:
  inputs: np.ndarray   # int32 [N, max_length], left-padded with [PAD], no [SEP]
  labels: np.ndarray   # int32 [N] class ids, or float32 [N] regression targets
  source: str          # where the rows came from (file, or file + hold-out description)

  def take(self, index: np.ndarray, source: str) -> "LabelledSplit":
    return LabelledSplit(self.inputs[index], self.labels[index], source)

  def __len__(self) -> int:
    return len(self.labels)


def read_split(path: str, labels_path: str = "", *, max_length: int, n_classes: int,
               truncate: bool = False, tokenizer: tok.CharacterTokenizer | None = None
               ) -> LabelledSplit:
  """Reads and encodes a labelled file: TSV/CSV `seq<TAB>label`, or FASTA + `name<TAB>label`.

  Errors name the file and line: a missing or non-numeric label, a class id outside
  [0, n_classes), a sequence longer than max_length (unless `truncate`), an empty file.
  """
  if not path:
    raise InputError("no data file given: set --config.data.train=PATH (TSV/CSV `seq<TAB>label`"
                     " or FASTA with --config.data.train_labels)")
  regression = n_classes == 1
  suffix = path[:-3] if path.endswith(".gz") else path
  if suffix.endswith((".fa", ".fasta", ".fna")):
    if not labels_path:
      raise InputError(f"{path} is FASTA: give its labels (`name<TAB>label` per record) with the "
                       "matching data.*_labels field")
    seqs, labels, lines = read_labelled_fasta(path, labels_path,
                                                       float_labels=regression, return_lines=True)
  else:
    seqs, labels, lines = read_labelled_sequences(path, float_labels=regression,
                                                           return_lines=True)
  if not regression:
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
      raise InputError(f"{path}:{lines[bad[0]]}: label {labels[bad[0]]} is not a class id of this "
                       f"task (head.n_classes={n_classes}: ids 0..{n_classes - 1}); "
                       f"{bad.size} such row(s)")
  if not truncate:
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    long = np.flatnonzero(lengths > max_length)
    if long.size:
      raise InputError(f"{path}:{lines[long[0]]}: sequence of {lengths[long[0]]} bases exceeds "
                       f"data.max_length={max_length} ({long.size} such row(s)); raise "
                       "data.max_length (at most model.l_max) or set data.truncate=True to keep "
                       "the first max_length bases")
  tokenizer = tokenizer or tok.CharacterTokenizer()
  inputs = tokenizer.encode_batch(seqs, max_length, add_eos=False, truncate=truncate)
  return LabelledSplit(inputs.astype(np.int32),
                       labels.astype(np.float32 if regression else np.int32), path)


def load_splits(config: ml_collections.ConfigDict) -> dict[str, LabelledSplit]:
  """train/valid/test splits from the files and hold-out fields of config.data (module doc of
  hyena_jax.downstream.finetune_config)."""
  d = config.data
  kw = dict(max_length=d.max_length, n_classes=config.head.n_classes, truncate=d.truncate)
  train = read_split(d.train, d.train_labels, **kw)
  if d.test:
    test = read_split(d.test, d.test_labels, **kw)
  else:
    tr, te = split_train_test(len(train), d.test_fraction, d.split_seed)
    held = f"{d.train} (hold-out {d.test_fraction:g}, split_train_test seed {d.split_seed})"
    train, test = train.take(tr, f"{d.train} (rest after test hold-out)"), train.take(te, held)
  if d.valid:
    valid = read_split(d.valid, d.valid_labels, **kw)
  elif d.valid_fraction > 0:
    tr, va = split_train_test(len(train), d.valid_fraction, d.split_seed + 1)
    held = (f"{train.source}: hold-out {d.valid_fraction:g} of the training rows "
            f"(split_train_test seed {d.split_seed + 1})")
    train, valid = train.take(tr, train.source), train.take(va, held)
  else:
    valid = LabelledSplit(test.inputs, test.labels, f"the test split ({test.source})")
  return {"train": train, "valid": valid, "test": test}


def check_trainable(train: LabelledSplit, config: ml_collections.ConfigDict) -> None:
  """Refuses to train a classifier on rows of one class (evaluating one is fine)."""
  present = np.unique(train.labels)
  if config.head.n_classes > 1 and len(present) < 2:
    raise InputError(
        f"the training rows of {config.data.train} hold one class only (label {present[0]}, "
        f"{len(train)} rows): a classifier needs examples of at least two classes; check the "
        "label column (and data.train_labels)")


# ------------------------------------------------------------------------------------------------
# Model


# ------------------------------------------------------------------------------------------------
# Labelled files: `seq<sep>label` tables, FASTA + `name<TAB>label`


def _parse_label(text: str, where: str, float_labels: bool = False) -> int | float:
  if float_labels:  # regression targets
    try:
      value = float(text.strip())
    except ValueError:
      raise InputError(f"{where}: label {text!r} is not a number (regression target)") from None
    if not np.isfinite(value):
      raise InputError(f"{where}: label {text!r} is not finite")
    return value
  try:
    label = int(text.strip())
  except ValueError:
    raise InputError(f"{where}: label {text!r} is not an integer class id") from None
  if label < 0:
    raise InputError(f"{where}: label {label} is negative; class ids start at 0")
  return label


def _check_dna(seq: str, where: str) -> None:
  if not seq:
    raise InputError(f"{where}: empty sequence")
  bad = set(seq) - DNA_BASES
  if bad:
    raise InputError(f"{where}: invalid character(s) {sorted(bad)} in the sequence; allowed: "
                     "ACGTN and IUPAC codes, any case")


def read_labelled_sequences(path: str | os.PathLike, *, float_labels: bool = False,
                            return_lines: bool = False) -> tuple[Any, ...]:
  """Reads `seq<sep>label` rows of a TSV/CSV (`table_delimiter`; plain or gzip).

  The one header rule (`is_header_row`) decides whether line 1 is a header; the columns named
  `seq`/`sequence` and `label` are then used (else the first two). Any other first line is
  data, so a header-less file whose first label is not a number is an error naming line 1,
  never a dropped row. Returns (sequences, int64 labels [N]), labels float32 with
  `float_labels` (regression), plus int64 line numbers [N] with `return_lines`.
  """
  path = os.fspath(path)
  seqs, labels, numbers = [], [], []
  seq_col, label_col, header_done = 0, 1, False
  delim = delimiter_of(path)
  for lineno, row in table_rows(path, delim):
    where = f"{path}:{lineno}"
    first_data = not header_done
    if not header_done:
      header_done = True
      if is_header_row(row):
        names = [c.strip().lower() for c in row]
        seq_col = next((names.index(n) for n in ("seq", "sequence") if n in names), 0)
        label_col = names.index("label") if "label" in names else 1
        continue
    if len(row) <= max(seq_col, label_col):
      raise InputError(f"{where}: expected `seq{delim!r}label`, got {len(row)} column(s)")
    try:
      seq = row[seq_col].strip()
      _check_dna(seq, where)
      labels.append(_parse_label(row[label_col], where, float_labels))
    except InputError as e:
      if not first_data:
        raise
      raise InputError(f"{e}; line 1 was read as data because a header row must name its "
                       f"columns (one of {', '.join(HEADER_NAMES)}, e.g. `seq{delim}label`)"
                       ) from None
    seqs.append(seq)
    numbers.append(lineno)
  if not seqs:
    raise InputError(f"{path}: no labelled sequences")
  out = (seqs, np.asarray(labels, np.float32 if float_labels else np.int64))
  return out + (np.asarray(numbers, np.int64),) if return_lines else out


def read_labelled_fasta(fasta_path: str | os.PathLike, labels_path: str | os.PathLike, *,
                        float_labels: bool = False, return_lines: bool = False
                        ) -> tuple[Any, ...]:
  """FASTA sequences + a `name<TAB>label` file (header by the one rule); every record needs a
  label. Returns (sequences, int64 labels [N]) in FASTA order; labels float32 with
  `float_labels`, plus the int64 FASTA header line of each record [N] with `return_lines`.
  """
  fasta_path, labels_path = os.fspath(fasta_path), os.fspath(labels_path)
  records = list(read_fasta(fasta_path))
  if not records:
    raise InputError(f"{fasta_path}: no FASTA records")
  for r in records:
    _check_dna(r.seq, r.where)
  by_name: dict[str, int | float] = {}
  for lineno, line in text_lines(labels_path):
    cols = line.strip().split("\t") if "\t" in line else line.split()
    if not cols:
      continue
    where = f"{labels_path}:{lineno}"
    if len(cols) != 2:
      raise InputError(f"{where}: expected `name<TAB>label`, got {len(cols)} column(s)")
    if not by_name and lineno == 1 and is_header_row(cols):
      continue
    if cols[0] in by_name:
      raise InputError(f"{where}: duplicate label for {cols[0]!r}")
    by_name[cols[0]] = _parse_label(cols[1], where, float_labels)
  missing = [r for r in records if r.name not in by_name]
  if missing:
    raise InputError(f"{fasta_path}:{missing[0].line}: record {missing[0].name!r} has no label "
                     f"in {labels_path} ({len(missing)} unlabelled)")
  out = ([r.seq for r in records],
         np.asarray([by_name[r.name] for r in records], np.float32 if float_labels else np.int64))
  return out + (np.asarray([r.line for r in records], np.int64),) if return_lines else out


# ------------------------------------------------------------------------------------------------
# VCF

