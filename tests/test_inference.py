"""Embeddings, likelihood scoring and generation (hyena_jax.embed / score / generate)."""

import gzip
import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hyena_jax
from conftest import shared_path
from hyena_jax.data import tokenizer as tok
from hyena_jax.inference import batching as inference
from hyena_jax.inference import embed, generate, score
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM

TOKENIZER = tok.CharacterTokenizer()
# Shared lengths and settings keep the number of distinct compiled shapes small.
LENGTHS = (5, 40, 17, 62)
EMBED_KW = dict(layers="final,0", batch_size=3, add_eos=True)


@pytest.fixture(scope="module")
def model():
  cfg = HyenaConfig(d_model=16, n_layer=2, d_inner=64, filter_order=8, l_max=128)
  lm = HyenaLM(cfg, rngs=nnx.Rngs(0))
  lm.eval()
  return lm


@pytest.fixture(scope="module")
def tiny_1k():
  return hyena_jax.load(shared_path("parity", "tiny_1k")).model


@nnx.jit
def _alone(lm, ids):
  """Reference: the model on one unpadded sequence [1, n]."""
  out = lm.backbone(ids, return_layers=True)
  return out.hidden, out.layers, lm.logits_from_hidden(out.hidden)


def _random_dna(rng, n):
  return "".join(rng.choice(list("ACGT"), n))


def _direct_logp(lm, ids, append_sep=True):
  """log p(ids[t] | ids[<t]) for t >= 1, straight from the logits of the unbatched model.

  With `append_sep` the model runs on ids + [SEP] (the -hf encoding, and shapes the embedding
  test already compiled); by causality the appended token changes no logit before it.
  """
  inputs = np.append(ids, tok.SEP) if append_sep else ids
  _, _, logits = _alone(lm, jnp.asarray(inputs)[None])
  logp = jax.nn.log_softmax(np.asarray(logits[0, :len(ids) - 1], np.float64), axis=-1)
  return np.asarray(logp)[np.arange(len(ids) - 1), ids[1:]]


# ------------------------------------------------------------------------------------------------
# Embeddings


def test_embed_batch_equals_each_sequence_alone(model):
  rng = np.random.default_rng(0)
  seqs = [_random_dna(rng, n) for n in LENGTHS]  # mixed lengths in batches of 3, chunks of 4
  per_pos = embed.embed(model, seqs, per_position=True, chunk_size=4, **EMBED_KW)
  mean = embed.embed(model, seqs, pooling="mean", chunk_size=4, **EMBED_KW)
  last = embed.embed(model, seqs, pooling="last", chunk_size=4, **EMBED_KW)
  assert mean.shape == (len(LENGTHS), 2, 16)
  for i, s in enumerate(seqs):
    ids = TOKENIZER.encode(s)                                  # bases + [SEP], no padding
    hidden, layers, _ = _alone(model, jnp.asarray(ids)[None])
    ref = np.stack([np.asarray(hidden[0]), np.asarray(layers[0][0])], axis=1)  # [n, 2, d]
    assert per_pos[i].shape == ref.shape
    np.testing.assert_allclose(per_pos[i], ref, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(mean[i], ref.mean(0), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(last[i], ref[-1], rtol=1e-5, atol=2e-5)


def test_embed_pad_to_reproduces_official_classifier_input():
  """pad_to = the official fine-tuning input: left [PAD]s, mean over all positions."""
  path = shared_path("parity", "tiny1k_classifier")
  pytest.importorskip("torch", reason="the fixture's weights.pt is a torch pickle")
  clf = hyena_jax.load(path / "weights.pt").model
  seqs = (path / "sequences.txt").read_text().split()
  pooled = embed.embed(clf, seqs, pad_to=512, pooling="mean", batch_size=8)[:, 0]
  hidden = np.load(path / "hidden.npy")
  np.testing.assert_allclose(pooled, hidden.mean(axis=1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(clf.output_transform(jnp.asarray(pooled))),
                             np.load(path / "class_logits.npy"), rtol=1e-4, atol=1e-4)
  # mean_nonpad averages only each sequence's own positions of the same forward pass.
  nonpad = embed.embed(clf, seqs[:2], pad_to=512, pooling="mean_nonpad", batch_size=8)[:, 0]
  for i in range(2):
    np.testing.assert_allclose(nonpad[i], hidden[i, 512 - len(seqs[i]):].mean(0),
                               rtol=1e-4, atol=1e-4)


def test_embed_file_streams_fasta_and_tsv(model, tmp_path):
  rng = np.random.default_rng(1)
  seqs = [_random_dna(rng, n) for n in (30, 7, 50)]
  fasta = tmp_path / "in.fa.gz"
  with gzip.open(fasta, "wt") as f:
    for i, s in enumerate(seqs):
      f.write(f">r{i} description\n{s[:20]}\n{s[20:]}\n")
  summary = embed.embed_file(model, str(fasta), str(tmp_path / "pp.npz"), per_position=True,
                             **EMBED_KW)
  assert summary["records"] == 3
  out = np.load(tmp_path / "pp.npz")
  assert list(out["names"]) == ["r0", "r1", "r2"]
  expected = embed.embed(model, seqs, per_position=True, **EMBED_KW)
  for i in range(3):
    got = out["embeddings"][out["offsets"][i]:out["offsets"][i + 1]]
    np.testing.assert_array_equal(got, expected[i])
  # TSV with a header row (GenomicBenchmarks style), pooled, into a memory-mappable .npy.
  table = tmp_path / "in.tsv"
  table.write_text("seq\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(seqs)))
  embed.embed_file(model, str(table), str(tmp_path / "pooled.npy"), **EMBED_KW)
  pooled = np.load(tmp_path / "pooled.npy", mmap_mode="r")
  index = np.load(tmp_path / "pooled.index.npz")
  assert list(index["names"]) == ["row1", "row2", "row3"]
  np.testing.assert_array_equal(index["lengths"], [31, 8, 51])             # bases + [SEP]
  np.testing.assert_allclose(pooled, np.stack([e.mean(0) for e in expected]), rtol=1e-6,
                             atol=1e-6)


def test_embed_bad_input(model, tmp_path):
  fa = tmp_path / "bad.fa"
  fa.write_text(">ok\nACGT\n>bad\nACGXT\n")
  with pytest.raises(ValueError, match=r"bad\.fa:3 \(record 'bad'\).*'X' at position 3"):
    embed.embed_file(model, str(fa), str(tmp_path / "o.npz"))
  assert not (tmp_path / "o.npz").exists()
  fa.write_text("")
  with pytest.raises(ValueError, match="no sequences found"):
    embed.embed_file(model, str(fa), str(tmp_path / "o.npz"))
  long = "A" * 200                                               # l_max is 128
  with pytest.raises(ValueError, match="exceed the model's l_max=128.*truncate"):
    embed.embed(model, [long])
  assert embed.embed(model, [long], truncate=True).shape == (1, 1, 16)
  with pytest.raises(ValueError, match="layer 5 does not exist"):
    embed.embed(model, ["ACGT"], layers=[5])


def _write(path, text):
  path.write_text(text)
  return path


# ------------------------------------------------------------------------------------------------
# Scoring


def test_scores_equal_sum_of_log_probs_from_logits(model):
  rng = np.random.default_rng(2)
  seqs = [_random_dna(rng, n) for n in LENGTHS]
  results = list(score.score_sequences(model, seqs, batch_size=2))
  with_ctx = list(score.score_sequences(model, seqs, batch_size=2, context_token=tok.SEP))
  totals = score.log_likelihood(model, seqs, batch_size=2)
  for i, s in enumerate(seqs):
    ids = TOKENIZER.encode(s, add_eos=False)
    direct = _direct_logp(model, ids)
    name, logp = results[i][0].name, results[i][1]
    assert name == f"seq{i}" and logp.shape == (len(s),) and np.isnan(logp[0])
    np.testing.assert_allclose(logp[1:], direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(totals[i], direct.sum(), rtol=1e-5, atol=1e-4)
    # With a context token the first base is scored given [SEP].
    direct_ctx = _direct_logp(model, np.concatenate([[tok.SEP], ids]), append_sep=False)
    assert with_ctx[i][1].shape == (len(s),)
    np.testing.assert_allclose(with_ctx[i][1], direct_ctx, rtol=1e-5, atol=1e-5)


def test_token_log_probs_match_official_logits(tiny_1k):
  """Against the logits the official PyTorch model produced for the fixture tokens."""
  path = shared_path("parity", "tiny_1k")
  tokens = np.load(path / "tokens.npy").astype(np.int32)
  logp = list(score.token_log_probs(tiny_1k, list(tokens), batch_size=2))
  official = jax.nn.log_softmax(np.load(path / "logits.npy").astype(np.float64), axis=-1)
  for row in range(len(tokens)):
    expected = np.asarray(official)[row, np.arange(tokens.shape[1] - 1), tokens[row, 1:]]
    np.testing.assert_allclose(logp[row][1:], expected, rtol=1e-4, atol=1e-4)


def _genome(tmp_path, rng):
  chroms = {"chrA": _random_dna(rng, 150), "chrB": _random_dna(rng, 90)}
  path = tmp_path / "genome.fa"
  path.write_text("".join(f">{n}\n{s[:60]}\n{s[60:]}\n" for n, s in chroms.items()))
  return path, chroms


def test_variant_scores_are_likelihood_ratios(model, tmp_path):
  rng = np.random.default_rng(3)
  fasta, chroms = _genome(tmp_path, rng)
  a, b = chroms["chrA"], chroms["chrB"]
  alt = "G" if a[69] != "G" else "T"
  vcf = _write(tmp_path / "v.vcf", "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\n"
               f"chrA\t70\tsnv\t{a[69]}\t{alt},{a[69]}\n"           # SNV + REF-as-ALT (llr 0)
               f"chrA\t100\tdel\t{a[99:103]}\t{a[99]}\n"             # 3-base deletion
               f"chrB\t5\tins\t{b[4]}\t{b[4]}TTGA\n")                # insertion near the start
  out = tmp_path / "effects.tsv"
  score.score_vcf_file(model, str(vcf), str(fasta), str(out), window=41, batch_size=2)
  rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
  assert [r[2] for r in rows] == ["snv", "snv", "del", "ins"]
  assert float(rows[1][5]) == 0.0                                  # alt == ref

  def loglik(seq):  # score_sequences equals the direct sum from logits (test above)
    return float(score.log_likelihood(model, [seq], batch_size=2)[0])

  cases = [(a, 69, a[69], alt), (a, 99, a[99:103], a[99]), (b, 4, b[4], b[4] + "TTGA")]
  for row, (chrom, s, ref, alt_allele) in zip([rows[0], rows[2], rows[3]], cases):
    left = (41 - len(ref)) // 2
    start, end = max(0, s - left), min(len(chrom), s + 41 - left)
    assert (int(row[8]), int(row[9])) == (start, end)
    ref_seq = chrom[start:end]
    alt_seq = chrom[start:s] + alt_allele + chrom[s + len(ref):end]
    np.testing.assert_allclose(float(row[6]), loglik(ref_seq), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(float(row[7]), loglik(alt_seq), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(float(row[5]), loglik(alt_seq) - loglik(ref_seq), atol=1e-4)


def test_default_window_fits_an_insertion(model, tmp_path):
  """Issue 11: the default window (min(1024, l_max) = 128 here) used to abort on any insertion
  of >= 3 bases; it now gives the insertion's window k fewer reference bases."""
  rng = np.random.default_rng(6)
  chrom = _random_dna(rng, 300)
  fasta = _write(tmp_path / "g.fa", f">c\n{chrom}\n")
  vcf = _write(tmp_path / "v.vcf", f"c\t150\tins\t{chrom[149]}\t{chrom[149]}TTGAC\n"
               f"c\t160\tsnv\t{chrom[159]}\t{'A' if chrom[159] != 'A' else 'C'}\n")
  out = tmp_path / "e.tsv"
  summary = score.score_vcf_file(model, str(vcf), str(fasta), str(out), batch_size=2)
  rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
  assert summary["variants"] == 2 and [r[2] for r in rows] == ["ins", "snv"]
  spans = [int(r[9]) - int(r[8]) for r in rows]
  assert spans == [128 - 5, 128]  # ALT adds 5 bases: ref window 123, alt window 128 = l_max
  start, end = int(rows[0][8]), int(rows[0][9])
  alt_seq = chrom[start:149] + chrom[149] + "TTGAC" + chrom[150:end]
  np.testing.assert_allclose(float(rows[0][7]), score.log_likelihood(model, [alt_seq])[0],
                             rtol=1e-6, atol=1e-4)


def test_variant_bad_input(model, tmp_path):
  rng = np.random.default_rng(4)
  fasta, chroms = _genome(tmp_path, rng)
  wrong = "A" if chroms["chrA"][9] != "A" else "C"
  cases = [
      (f"chrA\t10\t.\t{wrong}\tG\n", r"v\.vcf:2: REF '.' does not match the FASTA .* at chrA:10"),
      ("chrZ\t10\t.\tA\tG\n", r"v\.vcf:2: chromosome 'chrZ' is not in"),
      ("chrA\t10\t.\tA\t<DEL>\n", r"v\.vcf:2: ALT '<DEL>' is not supported"),
      ("chrA\t10\tA\tG\n", r"v\.vcf:2: expected at least 5 columns"),
      ("chrA\t149\t.\tACG\tA\n", r"v\.vcf:2: .* runs past the chromosome end"),
  ]
  for line, message in cases:
    vcf = _write(tmp_path / "v.vcf", "#CHROM\tPOS\tID\tREF\tALT\n" + line)
    with pytest.raises(ValueError, match=message):
      score.score_vcf_file(model, str(vcf), str(fasta), str(tmp_path / "o.tsv"))
  vcf = _write(tmp_path / "v.vcf", "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\n")
  with pytest.raises(ValueError, match=r"v\.vcf: no variants found"):
    score.score_vcf_file(model, str(vcf), str(fasta), str(tmp_path / "o.tsv"))
  vcf = _write(tmp_path / "v.vcf", f"chrA\t10\t.\t{chroms['chrA'][9]}\t{'A' * 120}\n")
  with pytest.raises(ValueError, match=r"v\.vcf:1: .* exceeds l_max=128; pass a smaller window"):
    score.score_vcf_file(model, str(vcf), str(fasta), str(tmp_path / "o.tsv"), window=100)
  clf_like = type("NotAnLM", (), {})()
  with pytest.raises(ValueError, match="needs a language model"):
    list(score.score_sequences(clf_like, ["ACGT"]))


# ------------------------------------------------------------------------------------------------
# Generation


def test_generate_cached_equals_recompute_and_is_reproducible(model):
  kw = dict(num_samples=3, seed=7, temperature=1.0)
  # A one-base prompt: the short filter's history starts empty (zeros), the edge case.
  fast = generate.generate(model, "A", 40, method="cached", **kw)
  slow = generate.generate(model, "A", 40, method="recompute", **kw)
  np.testing.assert_array_equal(fast.tokens, slow.tokens)
  np.testing.assert_allclose(fast.logits, slow.logits, rtol=1e-5, atol=1e-5)
  # The logits the fast path sampled from are the model's own on the generated sequence.
  full = np.concatenate([[tok.A], fast.tokens[0]])
  _, _, logits = _alone(model, jnp.asarray(full)[None])
  np.testing.assert_allclose(fast.logits[0], np.asarray(logits[0, :-1]), rtol=1e-5, atol=1e-5)
  again = generate.generate(model, "A", 40, method="cached", **kw)
  np.testing.assert_array_equal(again.tokens, fast.tokens)
  other = generate.generate(model, "A", 40, method="cached", **{**kw, "seed": 8})
  assert not np.array_equal(other.tokens, fast.tokens)
  assert set(np.unique(fast.tokens)) <= {tok.A, tok.C, tok.G, tok.T}
  assert all(len(s) == 40 and set(s) <= set("ACGT") for s in fast.sequences)
  # Different rows are different samples; top_k=1 is greedy decoding.
  assert len({s for s in fast.sequences}) > 1
  greedy = generate.generate(model, "ACGTTGCAAC", 20, temperature=0.0, num_samples=3)
  top1 = generate.generate(model, "ACGTTGCAAC", 20, top_k=1, seed=3, num_samples=3)
  assert (greedy.tokens == greedy.tokens[0]).all()
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)


def test_generate_with_pallas_conv_cached_equals_recompute(model):
  """conv_impl='pallas' (interpret mode on CPU): the prefill and every recompute forward run the
  kernel, the steps the cached dot product; same tokens, logits within 1e-5, and the fft model's
  own logits on the generated sequence."""
  pallas = HyenaLM(model.config.replace(conv_impl="pallas"), rngs=nnx.Rngs(0))
  pallas.eval()
  kw = dict(num_samples=2, seed=7)
  fast = generate.generate(pallas, "ACGTA", 20, method="cached", **kw)
  slow = generate.generate(pallas, "ACGTA", 20, method="recompute", **kw)
  np.testing.assert_array_equal(fast.tokens, slow.tokens)
  np.testing.assert_allclose(fast.logits, slow.logits, rtol=1e-5, atol=1e-5)
  full = np.concatenate([TOKENIZER.encode("ACGTA", add_eos=False), fast.tokens[0]])
  _, _, logits = _alone(model, jnp.asarray(full)[None])
  np.testing.assert_allclose(fast.logits[0], np.asarray(logits[0, 4:-1]), rtol=1e-5, atol=1e-5)


def test_generate_cached_equals_recompute_on_real_shapes(tiny_1k):
  rng = np.random.default_rng(5)
  prompt = _random_dna(rng, 100)
  kw = dict(num_samples=2, seed=0, top_k=3, allow_n=True)
  fast = generate.generate(tiny_1k, prompt, 28, method="cached", **kw)
  slow = generate.generate(tiny_1k, prompt, 28, method="recompute", **kw)
  np.testing.assert_array_equal(fast.tokens, slow.tokens)
  np.testing.assert_allclose(fast.logits, slow.logits, rtol=1e-4, atol=1e-4)


def test_generate_bad_input(model):
  with pytest.raises(ValueError, match="prompt is empty"):
    generate.generate(model, "", 5)
  with pytest.raises(ValueError, match="exceeds l_max=128"):
    generate.generate(model, "ACGT" * 30, 20)
  with pytest.raises(ValueError, match=r"prompt: invalid character '-' at position 2"):
    generate.generate(model, "AC-GT", 5)
  with pytest.raises(ValueError, match="top_k must lie in 0..4"):
    generate.generate(model, "ACGT", 5, top_k=5)


# ------------------------------------------------------------------------------------------------
# CLI


def test_score_file_outputs(model, tmp_path):
  fasta = _write(tmp_path / "s.fa", ">x\nACGTACGTTTGA\n>y\nGGGCCA\n")
  totals = score.log_likelihood(model, ["ACGTACGTTTGA", "GGGCCA"], batch_size=2)
  score.score_file(model, str(fasta), str(tmp_path / "s.tsv"), batch_size=2)
  rows = [line.split("\t") for line in (tmp_path / "s.tsv").read_text().splitlines()[1:]]
  assert [r[:3] for r in rows] == [["x", "12", "11"], ["y", "6", "5"]]
  np.testing.assert_allclose([float(r[3]) for r in rows], totals, rtol=1e-5, atol=1e-5)
  score.score_file(model, str(fasta), str(tmp_path / "s.npz"), batch_size=2)
  out = np.load(tmp_path / "s.npz")
  np.testing.assert_array_equal(out["offsets"], [0, 12, 18])
  np.testing.assert_allclose(out["loglik"], totals, rtol=1e-6)
  np.testing.assert_allclose(np.nansum(out["logp"][12:]), totals[1], rtol=1e-5)


def test_cli_generate_reproduces_the_function(model, tmp_path):
  """`python -m hyena_jax.generate` on an orbax workdir gives the function's samples."""
  from hyena_jax.training import checkpoint
  workdir = tmp_path / "run"
  checkpoint.save_model(str(workdir), model, {"model": model.config.to_dict()})
  out_fa = tmp_path / "gen.fa"
  subprocess.run([sys.executable, "-m", "hyena_jax.generate", f"--model={workdir}",
                  "--prompt=ACGTTGCAAC", "--num_new=20", "--num_samples=3", "--seed=11",
                  f"--output={out_fa}"], check=True, capture_output=True, text=True)
  samples = out_fa.read_text().splitlines()[1::2]
  assert samples == generate.generate(model, "ACGTTGCAAC", 20, num_samples=3, seed=11).sequences


def test_progress_bar_on_a_terminal_and_silent_in_logs(monkeypatch):
  """embed/score wrap their per-record results in a bar with a rate on a terminal; in a log
  file or pipe nothing is written, and the results pass through unchanged either way."""
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  for stream, shows in ((Terminal(), True), (io.StringIO(), False)):
    monkeypatch.setattr(sys, "stderr", stream)
    assert list(inference.with_progress(iter(range(3)), 3, "embed")) == [0, 1, 2]
    text = stream.getvalue()
    assert (("embed:" in text and "/3 [" in text and "seq/s" in text) if shows else text == ""), text
