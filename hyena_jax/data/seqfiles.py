"""Sequence files (FASTA and tables), read in one place, with errors that name the file and line.

  * text files: `text_lines` reads plain or gzip (told apart by the magic bytes, never by the
    suffix) and turns binary contents and damaged gzip into `file:line` errors;
  * streamed FASTA: `read_fasta` (any line width, CRLF, ';' comment lines), one Record at a time;
  * indexed FASTA: `open_fasta` (pyfaidx, `.fai` built beside the file) for genomes (random
    access to a variant's reference is `variants.ReferenceGenome`);
  * tables: `read_table` (one sequence column), with the one header rule (`is_header_row`) and
    the one delimiter rule (`table_delimiter`).
Labelled tables and FASTA + labels are `labelled.py`'s, VCF files `variants.py`'s.

Record names must be unique in every reader (results and labels are matched by name).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import os
import stat
import zlib
from typing import Iterable, Iterator

from hyena_jax import storage
from hyena_jax.data import tokenizer as tok
from hyena_jax.errors import InputError, MissingInputError

GZIP_MAGIC = b"\x1f\x8b"


FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fa.gz", ".fasta.gz", ".fna.gz")


TABLE_SUFFIXES = (".tsv", ".csv", ".txt", ".tsv.gz", ".csv.gz", ".txt.gz")


# The one header rule of every table reader: line 1 is a header exactly when one of its fields
# is one of these column names (any case); otherwise it is data, never silently dropped.
HEADER_NAMES = ("seq", "sequence", "name", "id", "label")


DNA_BASES = frozenset("ACGTN" + tok.IUPAC_AMBIGUITY + ("ACGTN" + tok.IUPAC_AMBIGUITY).lower())


ALLELE_BASES = set("ACGTNacgtn")


@dataclasses.dataclass(frozen=True)
class Record:
  name: str
  seq: str
  where: str       # "file:line (record 'name')" for error messages
  line: int = 0    # 1-based line of the FASTA header or table row (0: not from a file)


# ------------------------------------------------------------------------------------------------
# Text


def require_file(path: str, kind: str) -> None:
  """A readable regular file, or one line: not found, or not a regular file (a folder, FIFO,
  device or a link to one: a streamed reader would block or read forever)."""
  if not os.path.exists(path):
    raise MissingInputError(f"{kind} not found: {path}")
  if not os.path.isfile(path):
    what = ("a folder" if os.path.isdir(path) else
            "a FIFO" if stat.S_ISFIFO(os.stat(path).st_mode) else "a device or special file")
    raise InputError(f"{kind} {path} is {what}, not a regular file; give a file")


def compression(path: str | os.PathLike) -> str:
  """'plain', 'bgzip' or 'gzip', from the first block header (BGZF = gzip with a 'BC' field)."""
  with open(path, "rb") as f:
    head = f.read(18)
  if head[:2] != GZIP_MAGIC:
    return "plain"
  has_extra = len(head) >= 4 and head[3] & 0x04
  return "bgzip" if has_extra and head[12:14] == b"BC" else "gzip"


def text_lines(path: str | os.PathLike, *, encoding: str = "utf-8"
               ) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its newline) of a plain or gzip (by content) file.

  A binary file (NUL bytes, or bytes that are not `encoding`) and a damaged or truncated gzip
  stream raise InputError naming the file and the line, instead of a bare UnicodeDecodeError
  or EOFError from deep inside the reader.
  """
  path = os.fspath(path)
  require_file(path, "file")
  gz = compression(path) != "plain"
  lineno = 0
  try:
    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
      for raw in f:
        lineno += 1
        if b"\0" in raw:
          raise InputError(f"{path}:{lineno}: contains NUL bytes: a binary file, not text; is "
                           "this the right file?")
        yield lineno, raw.decode(encoding).rstrip("\r\n")
  except UnicodeDecodeError as e:
    raise InputError(f"{path}:{lineno}: byte 0x{e.object[e.start]:02x} at column {e.start + 1} "
                     f"is not {encoding} text: a binary file? is this the right file?") from None
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise InputError(f"{path}:{lineno + 1}: the gzip data is damaged or truncated ({e}); "
                     "re-download or re-compress the file") from None


def column_rows(path: str | os.PathLike, *, skip: tuple[str, ...] = ("#",),
                encoding: str = "utf-8") -> Iterator[tuple[str, list[str], str]]:
  """("file:line", columns, line) of each data row of a tab- or space-separated text file
  (plain or gzip, as `text_lines`); blank lines and lines starting with a `skip` prefix are
  left out. BED and VCF rows are read with it."""
  for lineno, line in text_lines(path, encoding=encoding):
    if line.strip() and not line.startswith(skip):
      yield f"{path}:{lineno}", (line.split("\t") if "\t" in line else line.split()), line


# ------------------------------------------------------------------------------------------------
# FASTA, streamed


def read_fasta(path: str | os.PathLike) -> Iterator[Record]:
  """Streams FASTA records (plain or gzip, any line width, CRLF ok). Name = header's first word.

  Errors name the file and line: text before the first header, a header without a name, a
  record without sequence, a name used twice, a binary file and a truncated gzip. Letters are
  not checked here (the tokenizer names a bad one's position). latin-1, so a stray non-ASCII
  byte reaches that check instead of failing as undecodable.
  """
  path = os.fspath(path)
  require_file(path, "FASTA file")
  name, header_line, parts = None, 0, []
  seen: dict[str, int] = {}

  def finish() -> Record:
    where = f"{path}:{header_line} (record {name!r})"
    if not parts:
      raise InputError(f"{where}: record has no sequence; remove it or add bases")
    return Record(name, "".join(parts), where, header_line)

  for lineno, line in text_lines(path, encoding="latin-1"):
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
    elif line.strip() and not line.startswith(";"):
      if name is None:
        raise InputError(f"{path}:{lineno}: text before the first '>' header; is this FASTA?")
      parts.append(line.strip())
  if name is not None:
    yield finish()


# ------------------------------------------------------------------------------------------------
# FASTA, indexed


def _header_line(path: str, name: str, nth: int = 1) -> int | None:
  """1-based line number of the `nth` FASTA header `>name ...` (only used to word errors)."""
  opener = gzip.open if compression(path) != "plain" else open
  with opener(path, "rt", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      if line.startswith(">") and line[1:].split(maxsplit=1)[:1] == [name]:
        nth -= 1
        if not nth:
          return lineno
  return None


def _first_binary_line(path: str) -> int:
  """Line number of the first line that is not UTF-8 text (for errors about binary files)."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      try:
        raw.decode("utf-8")
      except UnicodeDecodeError:
        return lineno
      if b"\0" in raw:
        return lineno
  return 1


def open_fasta(path: str | os.PathLike):
  """Opens an indexed FASTA with pyfaidx, building `<path>.fai` if needed, after checking it.

  Raises MissingInputError / InputError with the file, the line and the fix for: a missing
  file, plain gzip, text before the first header, ragged line widths, duplicate names, no
  records, and empty records. Returns a `pyfaidx.Fasta` reading raw case-preserving strings.
  """
  import pyfaidx  # pylint: disable=g-import-not-at-top  (only genome access needs it)

  path = storage.require_local(path, "FASTA file", "pyfaidx reads an indexed FASTA from a local "
                               "disk (random access to windows)")
  if os.path.exists(path):
    require_file(path, "FASTA file")
  if not os.path.isfile(path):
    raise MissingInputError(f"FASTA file {path} not found; set data.fasta to an existing file "
                            "(or '' for the bundled E. coli genome; launch/prepare_hg38.sh "
                            "downloads hg38)")
  if compression(path) == "gzip":
    raise InputError(
        f"{path} is plain gzip, which cannot be indexed for random access. Either decompress "
        f"it (`gunzip -k {path}`) or recompress it as BGZF (`gunzip -c {path} | bgzip > "
        f"{path[:-3] if path.endswith('.gz') else path}.bgz.gz`, bgzip is in htslib/tabix; "
        "reading BGZF also needs `pip install biopython`)")
  fai = path + ".fai"
  had_index = os.path.exists(fai)
  try:
    fasta = pyfaidx.Fasta(path, as_raw=True, sequence_always_upper=False, build_index=True)
  except pyfaidx.FastaIndexingError as e:
    raise InputError(f"{path}: not a valid indexable FASTA: {e}") from e
  except UnicodeDecodeError:
    raise InputError(f"{path}:{_first_binary_line(path)}: not a text FASTA file (bytes that are "
                     "not text: a binary file?); set data.fasta to a FASTA file") from None
  except ValueError as e:  # pyfaidx: 'Duplicate key "chr1"', after writing the .fai
    if not str(e).startswith("Duplicate key"):
      raise
    if not had_index and os.path.exists(fai):
      os.remove(fai)  # an index of a file we refuse would be reused silently next time
    name = str(e).split('"')[1] if '"' in str(e) else str(e)
    raise InputError(f"{path}:{_header_line(path, name, 2)}: FASTA record name {name!r} appears "
                     "more than once; names must be unique (rename or remove one)") from None
  except ImportError as e:
    raise InputError(f"{path} is BGZF-compressed, and pyfaidx needs Biopython to read it: "
                     f"`pip install biopython`, or decompress it with `bgzip -d`") from e
  empty = [name for name, rec in fasta.faidx.index.items() if rec.rlen == 0]
  if empty:
    line = _header_line(path, empty[0])
    fasta.close()
    raise InputError(f"{path}:{line}: FASTA record {empty[0]!r} is empty ({len(empty)} empty "
                     "record(s)); remove empty records from the file")
  if not fasta.faidx.index:
    fasta.close()
    raise InputError(f"{path}: FASTA has no records")
  return fasta


def chrom_sizes(fasta) -> dict[str, int]:
  """Record name -> length in bases of an `open_fasta` handle, in file order."""
  return {name: int(rec.rlen) for name, rec in fasta.faidx.index.items()}


def is_header_row(fields: list[str]) -> bool:
  """The one header rule (see HEADER_NAMES)."""
  return any(f.strip().lower() in HEADER_NAMES for f in fields)


def table_delimiter(path: str, first_line: str = "") -> str:
  """',' for .csv, tab for .tsv/.txt (also gzipped); otherwise tab if line 1 has one, else ','."""
  stem = path[:-3] if path.endswith(".gz") else path
  if stem.endswith(".csv"):
    return ","
  if stem.endswith((".tsv", ".txt")):
    return "\t"
  return "\t" if "\t" in first_line else ","


def delimiter_of(path: str) -> str:
  lines = text_lines(path, encoding="latin-1")
  first = next(lines, (0, ""))[1]
  lines.close()
  return table_delimiter(path, first)


def table_rows(path: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, fields) of each non-blank row of a TSV/CSV (plain or gzip), streamed."""
  current = [0]  # line number of the row csv.reader last returned (one row per line)

  def texts() -> Iterator[str]:
    for lineno, line in text_lines(path, encoding="latin-1"):
      current[0] = lineno
      yield line

  for row in csv.reader(texts(), delimiter=delimiter):
    if row and "".join(row).strip():
      yield current[0], row


def _chain(first: list, rest: Iterable) -> Iterator:
  yield from first
  yield from rest


def read_table(path: str | os.PathLike, column: int | str = 0, *, name_column: int | str | None
               = None, header: bool | None = None) -> Iterator[Record]:
  """Streams sequences from one column of a TSV or CSV file (see `table_delimiter`).

  `column`/`name_column` are 0-based indices or header names (a name implies a header).
  `header=None` applies the one header rule (`is_header_row`); a first line that is neither
  DNA nor such a header is an error, never dropped. Records are named by `name_column`, else
  `row<N>` (N = 1-based data row). Errors name the file and line.
  """
  path = os.fspath(path)
  require_file(path, "table file")
  named = isinstance(column, str) or isinstance(name_column, str)
  if header is False and named:
    raise InputError("columns given by name need a header row; pass indices or header=True")
  rows = table_rows(path, delimiter_of(path))
  first = next(rows, None)
  if first is None:
    return
  first_line, first_row = first
  if header is None:
    header = named or is_header_row(first_row)
    field = _field(first_row, _index(column, None), path, first_line).strip()
    if not header and not _looks_like_dna(field):
      raise InputError(f"{path}:{first_line}: {field[:40]!r} is neither DNA nor a column name; "
                       f"a header row must name its columns (one of {', '.join(HEADER_NAMES)}), "
                       "or pass the sequence column by name (--column=NAME)")
  names = first_row if header else None
  col = _index(column, names, path)
  name_col = None if name_column is None else _index(name_column, names, path)
  data_row = 0
  for lineno, row in _chain([] if header else [first], rows):
    data_row += 1
    seq = _field(row, col, path, lineno).strip()
    name = _field(row, name_col, path, lineno) if name_col is not None else f"row{data_row}"
    where = f"{path}:{lineno} (record {name!r})"
    if not seq:
      raise InputError(f"{where}: empty sequence")
    yield Record(name, seq, where, lineno)


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


def _looks_like_dna(text: str) -> bool:
  return bool(text) and set(text.strip()) <= DNA_BASES


def read_sequences(path: str | os.PathLike, *, fmt: str = "auto", column: int | str = 0,
                   name_column: int | str | None = None) -> Iterator[Record]:
  """FASTA or table records, chosen by `fmt` ("fasta" | "table" | "auto": by file suffix)."""
  path = os.fspath(path)
  if fmt == "auto":
    low = path.lower()
    fmt = ("fasta" if low.endswith(FASTA_SUFFIXES) else
           "table" if low.endswith(TABLE_SUFFIXES) else "")
    if not fmt:
      raise InputError(
          f"cannot tell the format of {path} from its suffix (FASTA: {', '.join(FASTA_SUFFIXES)};"
          f" tables: {', '.join(TABLE_SUFFIXES)}): name it on the command line with "
          "--format=fasta or --format=table (in Python: fmt='fasta' or 'table')")
  if fmt == "fasta":
    return read_fasta(path)
  if fmt == "table":
    return read_table(path, column, name_column=name_column)
  raise InputError(f"fmt must be 'auto', 'fasta' or 'table', got {fmt!r}")


# ------------------------------------------------------------------------------------------------
# Labelled sequences (fine-tuning)
