r"""Likelihood scoring: per-base log-likelihoods of sequences and variant-effect scores.

(`python -m hyena_jax.score` runs it from the command line.)

Per-base scores. For tokens x_0..x_{n-1} of a sequence, score[t] = log p(x_t | x_0..x_{t-1}),
the log-softmax of the model's logits at position t-1 over its whole (16-token) vocabulary, as
in training. The first base has no context, so score[0] is NaN ("not scored") unless
`context_token` is given (e.g. tokenizer.SEP = 1, "a new sequence starts here"): that token
is prepended and the first base is scored given it. No [SEP] is appended. A sequence's total
is the sum over its scored bases (`np.nansum`). Batching right-pads and so changes nothing.

Variant effects. A VCF-style variant (CHROM, 1-based POS, REF, ALT; SNVs, insertions and
deletions with or without the VCF anchor base; multi-allelic ALT gives one score per allele) is
scored on a window of `window` reference bases centred on REF: `ref_window = left + REF + right`
and `alt_window = left + ALT + right` (clipped at the chromosome ends), and

    llr = loglik(alt_window) - loglik(ref_window),   loglik = sum of per-base scores above

(forward strand, first base unscored in both). Positions before the variant have the same
scores in both windows (the model is causal), so `llr` measures how the allele changes the
likelihood of itself and of the bases after it. For indels the windows differ in length and
the score includes the probability of the inserted or deleted bases themselves (an insertion
of k bases costs about k * log 4 nats even when neutral), so compare indels with indels of the
same length, not with SNVs. A REF that does not match the FASTA is an error naming the VCF
file and line. The default window (min(1024, l_max)) is fitted to each allele: it shrinks as far
as an insertion needs for the ALT window to fit the model too (the TSV's
window_start/window_end say what was used); an explicit `--window` is taken as given.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyena_jax.data import seqfiles
from hyena_jax.data import tokenizer as tok
from hyena_jax.data.seqfiles import Record
from hyena_jax.data.variants import ReferenceGenome, Variant, read_vcf
from hyena_jax.errors import InputError
from hyena_jax.inference import batching as inference
from hyena_jax.inference import long_forward
from hyena_jax.model.hyenadna import HyenaLM


@nnx.jit
def _token_logp(model: HyenaLM, ids: jax.Array) -> jax.Array:
  """ids [B, T] -> [B, T] float32: entry t = log p(ids[t] | ids[<t]); entry 0 = NaN."""
  logp = jax.nn.log_softmax(model(ids)[:, :-1].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.concatenate([jnp.full((ids.shape[0], 1), jnp.nan, jnp.float32), picked], axis=1)


def _logp_compute(model: HyenaLM, max_memory_gb: float | None = None):
  """Batch -> per-row log-probabilities of the row's own tokens (right padding dropped)."""
  def compute(batch: inference.Batch) -> list[np.ndarray]:
    if long_forward.wants_long_path(model.config, *batch.ids.shape, max_memory_gb):
      out = np.asarray(long_forward.token_log_probs(model, batch.ids,
                                                    max_memory_gb=max_memory_gb))
    else:
      out = np.asarray(_token_logp(model, jnp.asarray(batch.ids)))
    return [out[row, :batch.lengths[row]] for row in range(len(batch.index))]
  return compute


def token_log_probs(model: HyenaLM, token_ids: Iterable[np.ndarray], *, batch_size: int = 8,
                    chunk_size: int | None = None, max_memory_gb: float | None = None
                    ) -> Iterator[np.ndarray]:
  """Streams float32 [n] per token array, in order: entry t = log p(x_t | x_<t), entry 0 NaN.

  The arrays are batched by length bucket with right padding, which no kept entry depends on.
  A batch that one jitted forward could not run within `max_memory_gb` (default: what the host
  has available) runs in bounded memory (long_forward.py).
  """
  model = inference.require_lm(model, "scoring")
  for _, logp in inference.run_chunked(token_ids, lambda ids: np.asarray(ids, np.int32),
                                       _logp_compute(model, max_memory_gb),
                                       batch_size=batch_size, l_max=model.config.l_max,
                                       chunk_size=chunk_size):
    yield logp


def score_sequences(model: HyenaLM, sequences: Iterable[str | Record], *,
                    context_token: int | None = None, truncate: bool = False,
                    batch_size: int = 8, tokenizer: tok.CharacterTokenizer | None = None,
                    max_memory_gb: float | None = None) -> Iterator[tuple[Record, np.ndarray]]:
  """Streams (record, per-base log-likelihoods float32 [n_bases]) in input order.

  Entry 0 is NaN unless `context_token` is given (see the module docstring). Sequences longer
  than l_max (minus the context token) raise unless `truncate` keeps their first bases.
  Plain strings are named seq0, seq1, ...
  """
  model = inference.require_lm(model, "scoring")
  tokenizer = tokenizer or tok.CharacterTokenizer()
  prefix = () if context_token is None else (int(context_token),)
  if prefix and not 0 <= prefix[0] < model.config.padded_vocab_size:
    raise InputError(f"context_token={context_token} is not a token id")
  encode = lambda r: inference.encode_record(tokenizer, r, model.config.l_max,  # noqa: E731
                                             truncate=truncate, prefix=prefix)
  for record, logp in inference.run_chunked(inference.as_records(sequences), encode,
                                            _logp_compute(model, max_memory_gb),
                                            batch_size=batch_size, l_max=model.config.l_max):
    yield record, logp[len(prefix):]


def log_likelihood(model: HyenaLM, sequences: Sequence[str], **kwargs) -> np.ndarray:
  """Total log-likelihood (sum over scored bases) of each sequence, float64 [N]."""
  return np.asarray([np.nansum(lp, dtype=np.float64)
                     for _, lp in score_sequences(model, sequences, **kwargs)])


# ------------------------------------------------------------------------------------------------
# Variants


@dataclasses.dataclass(frozen=True)
class VariantScore:
  variant: Variant
  llr: float            # loglik(alt window) - loglik(ref window)
  ref_loglik: float
  alt_loglik: float
  start: int            # window on the chromosome, 0-based half-open [start, end)
  end: int


def variant_windows(genome: ReferenceGenome, variant: Variant, window: int
                    ) -> tuple[str, str, int, int]:
  """(ref_window, alt_window, start, end) for a variant; checks REF against the FASTA."""
  v = variant
  if v.chrom not in genome:
    names = genome.names
    more = " ..." if len(names) > 5 else ""
    raise InputError(f"{v.where}: chromosome {v.chrom!r} is not in {genome.path} (it has "
                     f"{names[:5]}{more}); check the naming (chr1 vs 1)")
  chrom_len = genome.length(v.chrom)
  s, r = v.pos - 1, len(v.ref)
  if s + r > chrom_len:
    raise InputError(f"{v.where}: {v.chrom}:{v.pos} REF {v.ref} runs past the chromosome end "
                     f"({chrom_len} bp)")
  found = genome.fetch(v.chrom, s, s + r)
  if found != v.ref:
    raise InputError(f"{v.where}: REF {v.ref!r} does not match the FASTA {genome.path} at "
                     f"{v.chrom}:{v.pos} ({found!r}); is the VCF on the same assembly?")
  if window < r:
    raise InputError(f"{v.where}: window={window} is shorter than REF ({r} bases)")
  left = (window - r) // 2
  start, end = max(0, s - left), min(chrom_len, s + r + (window - r - left))
  before, after = genome.fetch(v.chrom, start, s), genome.fetch(v.chrom, s + r, end)
  return before + v.ref + after, before + v.alt + after, start, end


def fit_window(variant: Variant, window: int | None, room: int) -> int:
  """Reference bases around REF for one variant. An explicit `window` is used as given; the
  default, min(1024, room), shrinks only as far as the ALT window needs to fit the model (an
  insertion of k bases on a 1k model, room 1026, gets min(1024, 1026 - k) reference bases; the
  TSV's window_start/window_end record what was used). A REF or ALT allele longer than the
  model's input remains an error naming the VCF line."""
  if window:
    return window
  grow = max(0, len(variant.alt) - len(variant.ref))
  fitted = min(1024, room - grow)
  if fitted < len(variant.ref):
    raise InputError(f"{variant.where}: REF ({len(variant.ref)} bases) and ALT "
                     f"({len(variant.alt)} bases) cannot both fit the model's {room} input "
                     "positions; this variant cannot be scored with this model, remove it")
  return fitted


def score_variants(model: HyenaLM, genome: ReferenceGenome | str, variants: Iterable[Variant], *,
                   window: int | None = None, batch_size: int = 8,
                   context_token: int | None = None) -> Iterator[VariantScore]:
  """Streams a VariantScore per variant, in order (see the module docstring for the score).

  `window` (reference bases around REF) defaults to min(1024, l_max); the ALT window must
  also fit l_max (long insertions may need a smaller window).
  """
  model = inference.require_lm(model, "variant scoring")
  genome = genome if isinstance(genome, ReferenceGenome) else ReferenceGenome(genome)
  l_max = model.config.l_max
  room = l_max - (context_token is not None)
  tokenizer = tok.CharacterTokenizer()
  prefix = () if context_token is None else (int(context_token),)

  def items() -> Iterator[tuple]:
    for v in variants:
      ref_seq, alt_seq, start, end = variant_windows(genome, v, fit_window(v, window, room))
      for seq, allele in ((ref_seq, "ref"), (alt_seq, "alt")):
        if len(seq) > room:
          raise InputError(f"{v.where}: the {allele} window has {len(seq)} bases, more than "
                           f"l_max={l_max} allows; pass a smaller window")
      yield v, start, end, ref_seq, alt_seq

  def windows(stream) -> Iterator[tuple[tuple, np.ndarray]]:
    for item in stream:
      for seq in item[3:]:
        yield item, np.concatenate([np.asarray(prefix, np.int32),
                                    tokenizer.encode(seq, add_eos=False, where=item[0].where)])

  pending = None  # windows come back in order: each variant's ref, then its alt
  for (item, _), logp in inference.run_chunked(
      windows(items()), lambda pair: pair[1], _logp_compute(model), batch_size=batch_size,
      l_max=l_max):
    if pending is None:
      pending = np.nansum(logp, dtype=np.float64)
      continue
    v, start, end = item[:3]
    ref_ll, alt_ll = float(pending), float(np.nansum(logp, dtype=np.float64))
    pending = None
    yield VariantScore(v, alt_ll - ref_ll, ref_ll, alt_ll, start, end)


# ------------------------------------------------------------------------------------------------
# Files


def score_file(model: HyenaLM, input_path: str, output_path: str, *, fmt: str = "auto",
               column: int | str = 0, name_column: int | str | None = None,
               context_token: int | None = None, truncate: bool = False,
               batch_size: int = 8, max_memory_gb: float | None = None) -> dict:
  """Per-base scores of every record of a FASTA/TSV file, streamed to .npz or summed to .tsv.

  .npz: `logp` float32 [sum(lengths)] (record i = logp[offsets[i]:offsets[i+1]], first base NaN
  without a context token), `offsets`, `names`, `lengths`, `loglik` (float64 per record).
  .tsv: one line per record: name, bases, scored bases, loglik, mean per scored base.
  A first pass tokenizes everything, so bad input fails with file and line before any compute.
  """
  inference.check_local_output(output_path)
  if not output_path.endswith((".npz", ".tsv")):
    raise InputError(f"output must end with .npz (per base) or .tsv (per sequence): {output_path}")
  read = lambda: seqfiles.read_sequences(input_path, fmt=fmt, column=column,  # noqa: E731
                                          name_column=name_column)
  tokenizer = tok.CharacterTokenizer()
  prefix = () if context_token is None else (int(context_token),)
  names, lengths = [], []
  for record in read():  # validation pass
    ids = inference.encode_record(tokenizer, record, model.config.l_max, truncate=truncate,
                                  prefix=prefix)
    names.append(record.name)
    lengths.append(len(ids) - len(prefix))
  if not names:
    raise InputError(f"{input_path}: no sequences found")
  stream = score_sequences(model, read(), context_token=context_token, truncate=truncate,
                           batch_size=batch_size, tokenizer=tokenizer,
                           max_memory_gb=max_memory_gb)
  stream = inference.with_progress(stream, len(names), "score")
  totals = []
  if output_path.endswith(".npz"):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    with inference.NpzStreamWriter(output_path) as writer:
      writer.add("names", np.asarray(names))
      writer.add("lengths", np.asarray(lengths, np.int64))
      writer.add("offsets", offsets)
      writer.begin("logp", (int(offsets[-1]),))
      for _, logp in stream:
        writer.write(logp)
        totals.append(np.nansum(logp, dtype=np.float64))
      writer.add("loglik", np.asarray(totals))
  else:
    with inference.atomic_text(output_path) as f:
      f.write("name\tbases\tscored\tloglik\tmean_logp\n")
      for record, logp in stream:
        scored = int(np.isfinite(logp).sum())
        total = float(np.nansum(logp, dtype=np.float64))
        totals.append(total)
        f.write(f"{record.name}\t{len(logp)}\t{scored}\t{total:.6f}\t"
                f"{total / max(scored, 1):.6f}\n")
  return {"records": len(names), "bases": int(sum(lengths)), "outputs": [output_path]}


def score_vcf_file(model: HyenaLM, vcf_path: str, fasta_path: str, output_path: str, *,
                   window: int | None = None, batch_size: int = 8,
                   context_token: int | None = None) -> dict:
  """Scores every variant of a VCF against a FASTA into a TSV (one line per ALT allele).

  Every variant is checked first (chromosome, REF against the FASTA, windows within l_max), so
  a bad line fails with file and line before any compute.
  """
  inference.check_local_output(output_path)
  genome = ReferenceGenome(fasta_path)
  variants = list(read_vcf(vcf_path))
  if not variants:
    raise InputError(f"{vcf_path}: no variants found (only header or blank lines)")
  room = model.config.l_max - (context_token is not None)
  window_ = window or min(1024, room)
  for v in variants:  # validation pass
    ref_seq, alt_seq, _, _ = variant_windows(genome, v, fit_window(v, window, room))
    if max(len(ref_seq), len(alt_seq)) > room:
      raise InputError(f"{v.where}: a window of {max(len(ref_seq), len(alt_seq))} bases exceeds "
                       f"l_max={model.config.l_max}; pass a smaller window")
  with inference.atomic_text(output_path) as f:
    f.write("chrom\tpos\tid\tref\talt\tllr\tref_loglik\talt_loglik\twindow_start\twindow_end\n")
    for s in score_variants(model, genome, variants, window=window, batch_size=batch_size,
                            context_token=context_token):
      v = s.variant
      f.write(f"{v.chrom}\t{v.pos}\t{v.id}\t{v.ref}\t{v.alt}\t{s.llr:.6f}\t{s.ref_loglik:.6f}\t"
              f"{s.alt_loglik:.6f}\t{s.start}\t{s.end}\n")
  return {"variants": len(variants), "window": window_, "outputs": [output_path]}
