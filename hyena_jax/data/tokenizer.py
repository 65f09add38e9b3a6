"""Character tokenizer with the official HyenaDNA ids.

The official `CharacterTokenizer(characters=['A','C','G','T','N'])` assigns

    [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6 A=7 C=8 G=9 T=10 N=11

(vocab 12; the model pads its embedding table to 16). Sequences are left-padded with [PAD] and,
for language modelling, end with [SEP]. Encoding is a single numpy table lookup over the bytes
of the string, so a 1M-base window costs a few milliseconds.

Character policy (explicit, because genomes are not just ACGT):
  * lowercase (soft-masked repeats in hg38/UCSC FASTA): ``lowercase="upper"`` (default) reads
    them as the base they are; ``lowercase="unk"`` reproduces the official hg38 loader, which
    maps them to [UNK]=6 because its tokenizer is case-sensitive.
  * IUPAC ambiguity codes (R Y S W K M B D H V, either case): ``iupac="N"`` (default) maps them
    to N=11, the model's "unknown base" token; ``iupac="unk"`` maps them to [UNK]=6;
    ``iupac="error"`` refuses them.
  * anything else (digits, '-', '.', '*', whitespace, non-ASCII): always an error that names the
    character and its position. Nothing is dropped or reinterpreted silently.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import numpy as np

from hyena_jax.errors import InputError

CLS, SEP, BOS, MASK, PAD, RESERVED, UNK = 0, 1, 2, 3, 4, 5, 6
A, C, G, T, N = 7, 8, 9, 10, 11
VOCAB_SIZE = 12
SPECIAL_TOKENS = {CLS: "[CLS]", SEP: "[SEP]", BOS: "[BOS]", MASK: "[MASK]", PAD: "[PAD]",
                  RESERVED: "[RESERVED]", UNK: "[UNK]"}
BASE_IDS = {"A": A, "C": C, "G": G, "T": T, "N": N}
IUPAC_AMBIGUITY = "RYSWKMBDHV"

LowercasePolicy = Literal["upper", "unk"]
IupacPolicy = Literal["N", "unk", "error"]

_INVALID = -1


def _build_table(lowercase: LowercasePolicy, iupac: IupacPolicy) -> np.ndarray:
  if lowercase not in ("upper", "unk"):
    raise InputError(f"lowercase must be 'upper' or 'unk', got {lowercase!r}")
  if iupac not in ("N", "unk", "error"):
    raise InputError(f"iupac must be 'N', 'unk' or 'error', got {iupac!r}")
  table = np.full(256, _INVALID, np.int32)
  for base, idx in BASE_IDS.items():
    table[ord(base)] = idx
    table[ord(base.lower())] = idx if lowercase == "upper" else UNK
  if iupac != "error":
    for code in IUPAC_AMBIGUITY:
      upper_id = N if iupac == "N" else UNK
      table[ord(code)] = upper_id
      table[ord(code.lower())] = upper_id if lowercase == "upper" else UNK
  return table


_DECODE = np.array([""] * 16, dtype=object)
for _idx, _name in SPECIAL_TOKENS.items():
  _DECODE[_idx] = _name
for _base, _idx in BASE_IDS.items():
  _DECODE[_idx] = _base


class CharacterTokenizer:
  """Vectorised DNA tokenizer. See the module docstring for the character policy."""

  def __init__(self, lowercase: LowercasePolicy = "upper", iupac: IupacPolicy = "N"):
    self.lowercase = lowercase
    self.iupac = iupac
    self._table = _build_table(lowercase, iupac)
    # Reverse-complement lookup on token ids: A<->T, C<->G, everything else unchanged.
    self.complement = np.arange(16, dtype=np.int32)
    self.complement[[A, C, G, T]] = [T, G, C, A]

  def tokenize(self, seq: str | bytes, *, where: str = "sequence") -> np.ndarray:
    """Maps bases to ids without special tokens. Returns int32 [len(seq)]."""
    raw = seq.encode("latin-1", errors="replace") if isinstance(seq, str) else bytes(seq)
    if isinstance(seq, str) and not seq.isascii():
      bad = next(i for i, ch in enumerate(seq) if not ch.isascii())
      raise InputError(f"{where}: non-ASCII character {seq[bad]!r} at position {bad}; "
                       "DNA must be ASCII (ACGTN, lowercase, IUPAC codes)")
    ids = self._table[np.frombuffer(raw, dtype=np.uint8)]
    if ids.size and ids.min() < 0:
      bad = int(np.argmax(ids < 0))
      hint = ("IUPAC ambiguity codes are refused with iupac='error'"
              if chr(raw[bad]).upper() in IUPAC_AMBIGUITY else
              "allowed: A C G T N (any case) and IUPAC codes R Y S W K M B D H V")
      raise InputError(f"{where}: invalid character {chr(raw[bad])!r} at position {bad}; {hint}")
    return ids

  def encode(self, seq: str | bytes, max_length: int | None = None, *, add_eos: bool = True,
             truncate: bool = False, where: str = "sequence") -> np.ndarray:
    """Tokenizes one sequence, appends [SEP] if `add_eos`, left-pads with [PAD] to `max_length`.

    With `truncate=True` a sequence that does not fit keeps its first `max_length - add_eos`
    bases (the official `truncation=True` behaviour); otherwise it is an error.
    Returns int32 [max_length] (or [len(seq) + add_eos] without `max_length`).
    """
    ids = self.tokenize(seq, where=where)
    if max_length is not None:
      room = max_length - int(add_eos)
      if room < 0:
        raise InputError(f"max_length={max_length} leaves no room for [SEP]")
      if ids.size > room:
        if not truncate:
          raise InputError(f"{where}: {ids.size} bases do not fit max_length={max_length}"
                           f"{' with [SEP]' if add_eos else ''}; pass truncate=True to keep the "
                           f"first {room} bases, or raise max_length")
        ids = ids[:room]
    if add_eos:
      ids = np.concatenate([ids, np.array([SEP], np.int32)])
    if max_length is not None and ids.size < max_length:
      ids = np.concatenate([np.full(max_length - ids.size, PAD, np.int32), ids])
    return ids

  def encode_batch(self, seqs: Sequence[str], max_length: int, *, add_eos: bool = True,
                   truncate: bool = False) -> np.ndarray:
    """Left-padded batch, int32 [len(seqs), max_length]."""
    if len(seqs) == 0:
      raise InputError("encode_batch got no sequences")
    return np.stack([self.encode(s, max_length, add_eos=add_eos, truncate=truncate,
                                 where=f"sequence {i}") for i, s in enumerate(seqs)])

  def decode(self, ids: Iterable[int] | np.ndarray, *, skip_special: bool = True) -> str:
    """Inverse of `encode` for bases; special tokens are dropped or written as `[NAME]`."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= 16):
      raise InputError(f"token ids must lie in [0, 16), got range [{ids.min()}, {ids.max()}]")
    if skip_special:
      ids = ids[ids >= A]
    return "".join(_DECODE[ids])

  def reverse_complement(self, ids: np.ndarray) -> np.ndarray:
    """Reverse complement of base ids (A<->T, C<->G, N and specials unchanged), last axis."""
    return self.complement[np.asarray(ids)[..., ::-1]]
