"""Variants and the reference they are called against: VCF records (`read_vcf`) and random
access to a reference FASTA (`ReferenceGenome`), for variant-effect scoring
(`hyena_jax.inference.score`). Pretraining windows of a genome are `genome.py`'s.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

from hyena_jax.data.seqfiles import (ALLELE_BASES, column_rows, compression, open_fasta, read_fasta,
                                     require_file)
from hyena_jax.errors import InputError


class ReferenceGenome:
  """Random access to the sequences of a FASTA file, upper-cased (names = first header word).

  Upper case because variant alleles are compared with it, and VCF REF is case-insensitive
  while genome FASTA marks repeats in lower case. Files under `in_memory_bytes` (default 256 MB)
  and gzip files are read into memory with `read_fasta`, which accepts any line layout. Larger
  plain files go through `open_fasta` (pyfaidx), which writes `<path>.fai` beside the file once
  and needs equal line widths within each record (standard for genome FASTA such as hg38).
  """

  def __init__(self, path: str | os.PathLike, *, in_memory_bytes: int = 256 << 20):
    self.path = os.fspath(path)
    require_file(self.path, "FASTA file")
    self._faidx, self._seqs = None, None
    if compression(self.path) == "plain" and os.path.getsize(self.path) > in_memory_bytes:
      self._faidx = open_fasta(self.path)  # checks names, empty records, binary
    else:
      self._seqs = {r.name: r.seq.upper() for r in read_fasta(self.path)}

  @property
  def names(self) -> list[str]:
    return list(self._faidx.keys()) if self._faidx is not None else list(self._seqs)

  def length(self, chrom: str) -> int:
    if self._faidx is not None:
      return len(self._faidx[chrom])
    return len(self._seqs[chrom])

  def fetch(self, chrom: str, start: int, end: int) -> str:
    """Upper-case bases [start, end) (0-based) of `chrom`."""
    if self._faidx is not None:
      return self._faidx[chrom][start:end].upper()
    return self._seqs[chrom][start:end]

  def __contains__(self, chrom: str) -> bool:
    return chrom in self.names


# ------------------------------------------------------------------------------------------------
# Tables


@dataclasses.dataclass(frozen=True)
class Variant:
  chrom: str
  pos: int          # 1-based position of the first REF base (VCF POS)
  ref: str
  alt: str
  id: str = "."
  where: str = ""   # "file:line" for error messages


def read_vcf(path: str | os.PathLike) -> Iterator[Variant]:
  """Streams VCF records (CHROM POS ID REF ALT ...; '#' lines skipped; gzip ok) as Variants.

  Multi-allelic ALT ("A,T") gives one Variant per allele. Symbolic or missing alleles
  (<DEL>, *, ., breakends) and non-ACGTN letters are refused with the file and line.
  """
  path = os.fspath(path)
  require_file(path, "VCF file")
  for where, cols, _ in column_rows(path, encoding="latin-1"):
    if len(cols) < 5:
      raise InputError(f"{where}: expected at least 5 columns CHROM POS ID REF ALT, got "
                       f"{len(cols)}")
    chrom, pos, vid, ref, alts = cols[:5]
    try:
      pos_int = int(pos)
    except ValueError:
      raise InputError(f"{where}: POS {pos!r} is not an integer") from None
    if pos_int < 1:
      raise InputError(f"{where}: POS must be 1-based (>= 1), got {pos_int}")
    if not ref or not set(ref) <= ALLELE_BASES:
      raise InputError(f"{where}: REF {ref!r} must be bases A C G T N")
    for alt in alts.split(","):
      if not alt or not set(alt) <= ALLELE_BASES:
        raise InputError(f"{where}: ALT {alt!r} is not supported: only explicit alleles of "
                         "A C G T N (SNVs and indels); symbolic (<DEL>), missing (., *) and "
                         "breakend alleles cannot be scored")
      yield Variant(chrom, pos_int, ref.upper(), alt.upper(), vid, where)

