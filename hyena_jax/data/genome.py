"""Genome access for pretraining: indexed FASTA, BED intervals, tiling, and window construction.

This module knows nothing about Grain; `pretraining.py` builds the pipeline on top of it.

Windows follow the official HyenaDNA hg38 loader (SPEC section 3) with `max_length = seq_len + 1`:
  1. an interval shorter than max_length is extended symmetrically (`extra // 2` bases on the
     left, the rest on the right);
  2. the result is clipped to the allowed span (the chromosome for BED intervals, the tiling
     region for tiles, so train and valid tiles never share bases); edge windows come out short;
  3. an interval longer than max_length keeps its first max_length bases, or, with
     `random_offset`, max_length bases at a seeded offset (the official code has no offset);
  4. optional reverse complement of the fetched window (before truncation, as the official
     code does on the string);
  5. tokenization keeps the first max_length - 1 bases, appends [SEP] and left-pads with [PAD]
     to max_length tokens; `inputs = ids[:-1]`, `targets = ids[1:]`.

FASTA files are opened with `seqfiles.open_fasta` (plain text or bgzip; the `.fai` index is built
beside the FASTA on first use).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib

import numpy as np

from hyena_jax import storage
from hyena_jax.data import seqfiles
from hyena_jax.errors import InputError, MissingInputError

BED_SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Intervals:
  """Genomic intervals with the span each may be extended and clipped to.

  All arrays are int64 [n]: `chrom` indexes `names`; [start, end) is the interval; [lo, hi) is the
  span a window may cover (the chromosome for BED rows, the hold-out region for tiles).
  """
  names: tuple[str, ...]
  chrom: np.ndarray
  start: np.ndarray
  end: np.ndarray
  lo: np.ndarray
  hi: np.ndarray

  def __len__(self) -> int:
    return int(self.chrom.shape[0])

  @classmethod
  def from_rows(cls, names, rows: list[tuple[int, int, int, int, int]]) -> Intervals:
    arr = np.asarray(rows, np.int64).reshape(-1, 5)
    return cls(tuple(names), *(np.ascontiguousarray(arr[:, k]) for k in range(5)))


def read_bed(path: str | os.PathLike, sizes: dict[str, int], split: str | None = None
             ) -> Intervals:
  """Reads `chrom start end [split ...]` rows (tab or space separated; `.gz` allowed).

  Skips blank lines and `#`, `track`, `browser` lines. With `split`, keeps rows whose 4th column
  equals it (HyenaDNA's `human-sequences.bed`: train/valid/test). Every bad row is an error
  naming the file and line: too few columns, non-integer or negative coordinates, end <= start,
  a chromosome not in the FASTA, an end past the chromosome end, a missing or unknown split
  column value (one of BED_SPLITS).
  """
  path = storage.require_local(path, "BED file", "intervals are read from a local disk")
  if not os.path.isfile(path):
    raise MissingInputError(f"BED file {path} not found; set data.bed to an existing file, or "
                            "'' to tile the genome")
  names = list(sizes)
  index = {name: i for i, name in enumerate(names)}
  rows, seen_splits = [], {}
  # Plain or gzip told by content; binary files and damaged gzip are named with the line.
  for where, cols, line in seqfiles.column_rows(path, skip=("#", "track", "browser")):
    if len(cols) < 3:
      raise InputError(f"{where}: expected `chrom start end [split]`, got {len(cols)} "
                       f"column(s): {line[:80]!r}")
    chrom, start_s, end_s = cols[0], cols[1], cols[2]
    try:
      start, end = int(start_s), int(end_s)
    except ValueError:
      raise InputError(f"{where}: start/end must be integers, got {start_s!r} {end_s!r}"
                       ) from None
    if start < 0 or end <= start:
      raise InputError(f"{where}: bad interval {chrom}:{start}-{end} (need 0 <= start < end; "
                       "BED is 0-based, half-open)")
    if chrom not in index:
      sample = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
      raise InputError(f"{where}: chromosome {chrom!r} is not in the FASTA ({sample}); use "
                       "the genome the BED was made for (hg38 for human-sequences.bed)")
    if end > sizes[chrom]:
      raise InputError(f"{where}: end {end} is past the end of {chrom} ({sizes[chrom]} bp); "
                       "the BED and FASTA assemblies differ?")
    if split is not None:
      if len(cols) < 4:
        raise InputError(f"{where}: no split column (4th) to select split={split!r}")
      if cols[3] not in BED_SPLITS:  # a typo would otherwise drop its rows without a word
        raise InputError(f"{where}: unknown split {cols[3]!r} in the 4th column; use one of "
                         f"{', '.join(BED_SPLITS)} (as HyenaDNA's human-sequences.bed)")
      seen_splits[cols[3]] = seen_splits.get(cols[3], 0) + 1
      if cols[3] != split:
        continue
    rows.append((index[chrom], start, end, 0, sizes[chrom]))
  if not rows:
    found = f"; splits present: {dict(sorted(seen_splits.items()))}" if seen_splits else ""
    raise InputError(f"{path}: no intervals for split={split!r}{found}")
  return Intervals.from_rows(names, rows)


def tile_genome(sizes: dict[str, int], tile_length: int, valid_fraction: float, split: str
                ) -> Intervals:
  """Deterministic tiling hold-out when no BED is given.

  Each record is cut at `floor(len * (1 - valid_fraction))`: the part before is "train", the
  part after is "valid" (there is no "test" split: give a BED for that). Each part is tiled
  from its start with non-overlapping tiles of `tile_length`; the tail shorter than a tile is
  dropped, except that a part shorter than one tile becomes a single tile. Windows built from a
  tile are clipped to its part, so train and valid windows never share bases.
  """
  if split not in ("train", "valid"):
    raise InputError(f"tiling the genome (data.bed='') defines only 'train' and 'valid', got "
                     f"split={split!r}; give a BED with a split column for other splits")
  if not 0.0 < valid_fraction < 1.0:
    raise InputError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
  if tile_length < 1:
    raise InputError(f"tile_length must be >= 1, got {tile_length}")
  rows = []
  for c, (name, size) in enumerate(sizes.items()):
    cut = int(size * (1.0 - valid_fraction))
    lo, hi = (0, cut) if split == "train" else (cut, size)
    if hi <= lo:
      continue
    n = (hi - lo) // tile_length
    if n == 0:
      rows.append((c, lo, hi, lo, hi))
    for k in range(n):
      rows.append((c, lo + k * tile_length, lo + (k + 1) * tile_length, lo, hi))
  if not rows:
    raise InputError(f"the genome ({sum(sizes.values())} bp) gives no {split!r} tiles")
  return Intervals.from_rows(sizes, rows)


def window_span(start: int, end: int, lo: int, hi: int, max_length: int, offset: int = 0
                ) -> tuple[int, int]:
  """[s, e) read for one interval (steps 1-3 of the module docstring). `offset` only applies to
  intervals longer than max_length and must lie in [0, (end - start) - max_length]."""
  length = end - start
  if length < max_length:
    extra = max_length - length
    start -= extra // 2
    end += extra - extra // 2
  start, end = max(start, lo), min(end, hi)
  if length > max_length:
    start += offset
    end = start + max_length
  return start, end


class GenomeWindows:
  """Tokenized LM windows over a FASTA, built a batch at a time.

  `batch(indices, offsets_u, flips)` gives {"inputs": int32 [b, seq_len], "targets": int32
  [b, seq_len], "loss_mask": float32 [b, seq_len]}; index -1 is a filler row (all [PAD],
  loss_mask 0). The augmentation draws come from the caller (Grain's random_map RNG) so that the
  windows are a pure function of (indices, draws). Picklable for Grain worker processes: the
  pyfaidx handle is opened lazily in each process and dropped when pickled.
  """

  def __init__(self, fasta_path: str, intervals: Intervals, seq_len: int, tokenizer, *,
               rc_aug: bool, random_offset: bool, replace_n: bool, mask_pad: bool):
    self.fasta_path = fasta_path
    self.intervals = intervals
    self.max_length = seq_len + 1
    self.tokenizer = tokenizer
    self.rc_aug = rc_aug
    self.random_offset = random_offset
    self.replace_n = replace_n
    self.mask_pad = mask_pad
    self._fasta = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fasta"] = None
    return state

  def __len__(self) -> int:
    return len(self.intervals)

  def span(self, i: int, offset_u: float | None = None) -> tuple[str, int, int]:
    """(chrom, s, e) read for window i. `offset_u` in [0, 1) picks the crop of an interval longer
    than the window when `random_offset` is on (None: the official first bases)."""
    iv = self.intervals
    start, end = int(iv.start[i]), int(iv.end[i])
    offset = 0
    if offset_u is not None and self.random_offset and end - start > self.max_length:
      choices = end - start - self.max_length + 1
      offset = min(int(offset_u * choices), choices - 1)
    s, e = window_span(start, end, int(iv.lo[i]), int(iv.hi[i]), self.max_length, offset)
    return iv.names[iv.chrom[i]], s, e

  def bases(self, i: int, offset_u: float | None = None) -> np.ndarray:
    """Base ids of window i before truncation, int32 [e - s] (<= seq_len + 1)."""
    if self._fasta is None:
      self._fasta = seqfiles.open_fasta(self.fasta_path)
    chrom, s, e = self.span(i, offset_u)
    where = f"{self.fasta_path} {chrom}:{s}-{e}"
    seq = self._fasta.get_seq(chrom, s + 1, e) if e > s else ""
    ids = self.tokenizer.tokenize(seq, where=where)
    if ids.shape[0] != e - s:
      raise InputError(f"{where}: read {ids.shape[0]} bases, expected {e - s}; is the .fai "
                       "index stale? delete it to rebuild")
    return ids

  def batch(self, indices: np.ndarray, offsets_u: np.ndarray | None = None,
            flips: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """LM examples for windows `indices` [b] (steps 1-5 of the module docstring).

    `offsets_u` float [b] in [0, 1) and `flips` bool [b] are the augmentation draws; they are
    ignored unless `random_offset` / `rc_aug` is on.
    """
    # Imported here to keep the token constants in one place (tokenizer.py).
    from hyena_jax.data.tokenizer import PAD, SEP, N  # pylint: disable=g-import-not-at-top

    indices = np.asarray(indices).reshape(-1)
    length = self.max_length - 1
    ids = np.full((indices.shape[0], self.max_length), PAD, np.int32)
    real = indices >= 0
    for row, i in enumerate(indices):
      if i < 0:
        continue
      bases = self.bases(int(i), None if offsets_u is None else float(offsets_u[row]))
      if self.rc_aug and flips is not None and flips[row]:
        bases = self.tokenizer.complement[bases[::-1]]
      keep = min(bases.shape[0], length)  # the tokenizer keeps max_length - 1 bases + [SEP]
      ids[row, length - keep:length] = bases[:keep]
    ids[real, -1] = SEP
    if self.replace_n:
      ids[ids == N] = PAD
    targets = ids[:, 1:]
    if self.mask_pad:
      loss_mask = (targets != PAD).astype(np.float32)
    else:
      loss_mask = np.repeat(real[:, None].astype(np.float32), length, axis=1)
    return {"inputs": np.ascontiguousarray(ids[:, :-1]), "targets": np.ascontiguousarray(targets),
            "loss_mask": loss_mask}

  def example(self, i: int, offset_u: float | None = None, flip: bool = False
              ) -> dict[str, np.ndarray]:
    """One window: the arrays of `batch` without the batch axis, [seq_len]."""
    out = self.batch(np.array([i]), None if offset_u is None else np.array([offset_u]),
                     np.array([flip]))
    return {k: v[0] for k, v in out.items()}


def decompress_to(src: pathlib.Path, dst: pathlib.Path) -> None:
  """gunzip src into dst atomically (temp file + rename), so concurrent processes are safe."""
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
  with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
    while chunk := fin.read(1 << 20):
      fout.write(chunk)
  os.replace(tmp, dst)
