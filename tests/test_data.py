"""Genome pipeline and fine-tuning sources, checked against a plain-Python reference."""

import gzip
import os
import pathlib
import re
import shutil

import numpy as np
import pytest

from conftest import shared_path
from hyena_jax.data import genome, labelled
from hyena_jax.data import pretraining as data
from hyena_jax.data import seqfiles
from hyena_jax.data import tokenizer as tok
from hyena_jax.errors import InputError

# ---------------------------------------------------------------------------------------------
# Reference: the official construction written out on Python strings.
# ---------------------------------------------------------------------------------------------
_REF_IDS = {"A": 7, "C": 8, "G": 9, "T": 10, "N": 11}
_REF_COMPLEMENT = str.maketrans("ACGTacgt", "TGCAtgca")


def read_fasta(path):
  records, name = {}, None
  opener = gzip.open if str(path).endswith(".gz") else open
  with opener(path, "rt") as f:
    for line in f:
      line = line.rstrip("\r\n")
      if line.startswith(">"):
        name = line[1:].split()[0]
        records[name] = []
      else:
        records[name].append(line)
  return {k: "".join(v) for k, v in records.items()}


def reference_example(chrom_seq, start, end, max_length, *, lo=0, hi=None, rc=False,
                      lowercase="upper", replace_n=False):
  """inputs, targets of the official FastaInterval + tokenizer + ids[:-1]/ids[1:]."""
  hi = len(chrom_seq) if hi is None else hi
  length = end - start
  if length < max_length:
    extra = max_length - length
    start, end = start - extra // 2, end + extra - extra // 2
  start, end = max(start, lo), min(end, hi)
  if length > max_length:
    end = start + max_length
  s = chrom_seq[start:end]
  if rc:
    s = s.translate(_REF_COMPLEMENT)[::-1]
  s = s[:max_length - 1]
  if lowercase == "upper":
    ids = [_REF_IDS[ch.upper()] for ch in s]
  else:  # the official case-sensitive tokenizer: soft-masked bases are [UNK]
    ids = [_REF_IDS.get(ch, 6) for ch in s]
  ids = [4] * (max_length - 1 - len(ids)) + ids + [1]
  if replace_n:
    ids = [4 if t == 11 else t for t in ids]
  return np.array(ids[:-1], np.int32), np.array(ids[1:], np.int32)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  """The bundled genome is decompressed into a temporary cache, not the user's ~/.cache."""
  old = os.environ.get("HYENA_JAX_CACHE")
  os.environ["HYENA_JAX_CACHE"] = str(tmp_path_factory.mktemp("cache"))
  yield
  if old is None:
    del os.environ["HYENA_JAX_CACHE"]
  else:
    os.environ["HYENA_JAX_CACHE"] = old


def write_bed(path, rows):
  path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def fragments(tmp_path_factory):
  """Copy of the soft-masked hg38 fragments (pyfaidx writes the .fai beside the FASTA)."""
  src = shared_path("data", "human", "blat_fragments.hg38.fa")
  dst = tmp_path_factory.mktemp("frag") / "fragments.fa"
  shutil.copy(src, dst)
  return str(dst), read_fasta(dst)


@pytest.fixture(scope="module")
def with_n(tmp_path_factory):
  """A small genome with N runs and lowercase bases, 60 bases per line."""
  rng = np.random.default_rng(0)
  seq = np.array(list("ACGTacgt"))[rng.integers(0, 8, 6000)]
  seq[100:160] = "N"
  seq[2000:2003] = "n"
  seq = "".join(seq)
  path = tmp_path_factory.mktemp("n") / "n.fa"
  path.write_text(">chrN test\n" + "".join(seq[i:i + 60] + "\n" for i in range(0, 6000, 60)))
  return str(path), seq


def cfg_for(fasta, bed="", **kw):
  cfg = data.default_config()
  cfg.fasta, cfg.bed = fasta, bed
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Window construction
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lowercase", ["upper", "unk"])
def test_bed_windows_match_reference(fragments, tmp_path, lowercase):
  path, seqs = fragments
  (c1, s1), (c2, s2) = seqs.items()
  rows = [(c1, 1000, 1100, "valid"),            # short: extended both sides
          (c1, 3, 40, "valid"),                 # clipped at the left end -> left [PAD]
          (c2, len(s2) - 30, len(s2), "valid"),  # clipped at the right end
          (c1, 20000, 25000, "valid"),          # long: first max_length bases
          (c2, 500, 757, "valid"),              # exactly max_length
          (c1, 0, len(s1), "train")]
  bed = write_bed(tmp_path / "x.bed", rows)
  for seq_len in (256, 1023):
    ds = data.make_pretrain_dataset(cfg_for(path, bed, lowercase=lowercase), split="valid",
                                    seq_len=seq_len, global_batch_size=4, seed=0,
                                    process_index=0, process_count=1, num_epochs=1)
    got = [b for b in ds]
    assert len(got) == 2  # 5 windows + 3 filler rows
    inputs = np.concatenate([b["inputs"] for b in got])
    targets = np.concatenate([b["targets"] for b in got])
    mask = np.concatenate([b["loss_mask"] for b in got])
    for row, (chrom, start, end, _) in enumerate(rows[:5]):
      ref_in, ref_tg = reference_example(seqs[chrom], start, end, seq_len + 1,
                                         lowercase=lowercase)
      np.testing.assert_array_equal(inputs[row], ref_in, err_msg=f"row {row} seq_len {seq_len}")
      np.testing.assert_array_equal(targets[row], ref_tg)
    assert targets[:5, -1].tolist() == [tok.SEP] * 5
    assert (inputs[1, :10] == tok.PAD).all() and (mask[:5] == 1).all()  # official: PAD counted
    assert (inputs[5:] == tok.PAD).all() and (mask[5:] == 0).all()      # filler rows
  if lowercase == "unk":
    assert (inputs[:5] == tok.UNK).any()


def test_bundled_genome_tiling_matches_reference():
  seq = read_fasta(shared_path("data", "genomes", "ecoli_k12_w3110.fa.gz"))["NC_007779.1"]
  path = data.bundled_genome()
  assert read_fasta(path)["NC_007779.1"] == seq
  seq_len, cut = 4095, int(len(seq) * 0.95)
  spans = {}
  for split in ("train", "valid"):
    w = data.make_pretrain_windows(cfg_for(""), split=split, seq_len=seq_len)
    iv = w.intervals
    spans[split] = (iv.start, iv.end)
    assert (iv.end - iv.start == seq_len + 1).all() and (np.diff(iv.start) == seq_len + 1).all()
    lo, hi = (0, cut) if split == "train" else (cut, len(seq))
    assert iv.start[0] == lo and hi - iv.end[-1] < seq_len + 1
    for i in (0, len(w) // 2, len(w) - 1):
      ref_in, ref_tg = reference_example(seq, iv.start[i], iv.end[i], seq_len + 1, lo=lo, hi=hi)
      ex = w.example(i, None)
      np.testing.assert_array_equal(ex["inputs"], ref_in)
      np.testing.assert_array_equal(ex["targets"], ref_tg)
  assert spans["train"][1][-1] <= spans["valid"][0][0]  # no shared bases
  # A window longer than the valid region stays inside it (left-padded, no train bases).
  w = data.make_pretrain_windows(cfg_for(""), split="valid", seq_len=300_000)
  ex = w.example(0, None)
  n_bases = int((ex["inputs"] != tok.PAD).sum())
  assert len(w) == 1 and n_bases == len(seq) - cut
  ref_in, _ = reference_example(seq, cut, len(seq), 300_001, lo=cut)
  np.testing.assert_array_equal(ex["inputs"], ref_in)


def test_reverse_complement_exact_and_half(with_n, tmp_path):
  path, seq = with_n
  rows = [("chrN", s, s + 64, "train") for s in range(0, 5824, 13)]  # 448 windows, N and n too
  bed = write_bed(tmp_path / "rc.bed", rows)
  ref = {bytes(reference_example(seq, s, e, 64)[0]): (s, e) for _, s, e, _ in rows}
  assert len(ref) == len(rows)
  streams = [batches(data.make_pretrain_dataset(
      cfg_for(path, bed, rc_aug=rc), split="train", seq_len=63, global_batch_size=8, seed=5,
      process_index=0, process_count=1), 56) for rc in (False, True)]
  plain, aug = (np.concatenate([b["inputs"] for b in st]) for st in streams)
  flips = 0
  for p_row, a_row in zip(plain, aug):
    s, e = ref[bytes(p_row)]  # same seed: same window order with and without rc_aug
    if not np.array_equal(a_row, p_row):
      np.testing.assert_array_equal(a_row, reference_example(seq, s, e, 64, rc=True)[0])
      flips += 1
  assert 0.4 < flips / len(rows) < 0.6, flips / len(rows)
  assert len({ref[bytes(r)] for r in plain}) == len(rows)  # one epoch: every window once
  np.testing.assert_array_equal(tok.CharacterTokenizer().reverse_complement(
      np.array([tok.A, tok.C, tok.G, tok.T, tok.N])), [tok.N, tok.A, tok.C, tok.G, tok.T])


def test_random_offset_replace_n_and_mask_pad(with_n, tmp_path):
  path, seq = with_n
  bed = write_bed(tmp_path / "o.bed", [("chrN", 50, 450, "train"), ("chrN", 5990, 6000, "train")])
  cfg = cfg_for(path, bed, random_offset=True, replace_n=True, mask_pad=True)
  w = data.make_pretrain_windows(cfg, split="train", seq_len=99)
  starts, masked = set(), 0
  for k in range(40):
    u = np.random.default_rng(k).random()
    _, s, e = w.span(0, u)
    assert 50 <= s and e <= 450 and e - s == 100
    starts.add(s)
    ex = w.example(0, u)
    ref_in, ref_tg = reference_example(seq, s, e, 100, replace_n=True)
    np.testing.assert_array_equal(ex["inputs"], ref_in)
    np.testing.assert_array_equal(ex["loss_mask"], (ref_tg != tok.PAD).astype(np.float32))
    assert not (ex["inputs"] == tok.N).any()
    masked += int((ex["loss_mask"] == 0).any())  # windows over the N run at [100, 160)
  assert masked > 0 and len(starts) > 20 and w.span(0)[1:3] == (50, 150)  # no rng: official first bases
  edge = w.example(1, 0.5)  # extended to [5945, 6045), clipped at 6000
  _, ref_tg = reference_example(seq, 5990, 6000, 100, replace_n=True)
  np.testing.assert_array_equal(edge["loss_mask"], (ref_tg != tok.PAD).astype(np.float32))
  assert edge["loss_mask"].sum() == 6000 - 5945 + 1  # bases + [SEP]


# ---------------------------------------------------------------------------------------------
# Pipeline: seeds, hosts, checkpoints
# ---------------------------------------------------------------------------------------------


def _train_ds(path, bed, seed, pi=0, pc=1, aug=True, **kw):
  return data.make_pretrain_dataset(cfg_for(path, bed, rc_aug=aug, random_offset=aug, **kw),
                                    split="train", seq_len=31, global_batch_size=8, seed=seed,
                                    process_index=pi, process_count=pc)


def test_seeded_shuffle_epochs_and_host_partition(with_n, tmp_path):
  path, _ = with_n
  bed = write_bed(tmp_path / "s.bed", [("chrN", 100 * k, 100 * k + 48, "train") for k in range(24)])
  a, b = batches(_train_ds(path, bed, 3), 9), batches(_train_ds(path, bed, 3), 9)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["inputs"], batches(_train_ds(path, bed, 4), 1)[0]["inputs"])
  # 24 windows = 3 batches per epoch: each epoch has every window once, in a new order.
  plain = batches(_train_ds(path, bed, 3, aug=False), 9)
  order = np.concatenate([x["inputs"] for x in plain]).reshape(3, 24, -1)
  keys = [sorted(map(bytes, e)) for e in order]
  assert keys[0] == keys[1] == keys[2] and len(set(keys[0])) == 24
  assert not np.array_equal(order[0], order[1])
  # Two hosts: disjoint halves of exactly the single-host global batch, step by step.
  h0 = batches(_train_ds(path, bed, 3, pi=0, pc=2), 6)
  h1 = batches(_train_ds(path, bed, 3, pi=1, pc=2), 6)
  for t in range(6):
    assert h0[t]["inputs"].shape == (4, 31)
    merged = np.concatenate([h0[t]["inputs"], h1[t]["inputs"]])   # contiguous blocks
    np.testing.assert_array_equal(merged, a[t]["inputs"])


def test_valid_pass_partitions_hosts(fragments, tmp_path):
  path, _ = fragments
  cfg = cfg_for(path, valid_fraction=0.3)
  n = len(data.make_pretrain_windows(cfg, split="valid", seq_len=99))
  assert n % 6  # so that the pass needs filler rows
  one = np.concatenate([b["inputs"] for b in data.make_pretrain_dataset(
      cfg, split="valid", seq_len=99, global_batch_size=6, seed=0, process_index=0,
      process_count=1, num_epochs=1)])
  hosts = [[b for b in data.make_pretrain_dataset(
      cfg, split="valid", seq_len=99, global_batch_size=6, seed=0, process_index=p,
      process_count=3, num_epochs=1)] for p in range(3)]
  assert len({len(h) for h in hosts}) == 1 and len(one) == len(hosts[0]) * 6 >= n > len(one) - 6
  rows = np.concatenate([np.concatenate([b["inputs"] for b in h]) for h in hosts])
  masks = np.concatenate([np.concatenate([b["loss_mask"] for b in h]) for h in hosts])
  real = rows[masks.sum(-1) > 0]
  assert len(real) == n and len({bytes(r) for r in real}) == n  # each window exactly once
  assert sorted(map(bytes, real)) == sorted(map(bytes, one[:n]))


@pytest.mark.parametrize("workers", [0, 2])
def test_checkpoint_restore_reproduces_batches(with_n, tmp_path, workers):
  import grain
  import orbax.checkpoint as ocp

  path, _ = with_n
  bed = write_bed(tmp_path / "c.bed", [("chrN", 37 * k, 37 * k + 90, "train") for k in range(40)])
  it = iter(_train_ds(path, bed, 7, num_workers=workers))
  for _ in range(4):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(6)]  # crosses an epoch boundary (5 batches per epoch)
  restored = iter(_train_ds(path, bed, 7, num_workers=workers))
  mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for x, y in zip(expected, [next(restored) for _ in range(6)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  for i in (it, restored):
    i.close()


def test_worker_error_reaches_the_caller(tmp_path):
  bad = tmp_path / "bad.fa"
  bad.write_text(">a\n" + "ACGT" * 10 + "\n" + "AC*T" * 10 + "\n")
  ds = data.make_pretrain_dataset(cfg_for(str(bad), valid_fraction=0.1, num_workers=1),
                                  split="train", seq_len=7, global_batch_size=2, seed=0,
                                  process_index=0, process_count=1)
  it = iter(ds)
  with pytest.raises(ValueError, match=r"bad\.fa a:\d+-\d+: invalid character '\*'"):
    for _ in range(3):  # the first batch might come from the clean half
      next(it)
  it.close()


def test_to_global_batch_shards_rows():
  import jax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = {"inputs": np.arange(8 * 5, dtype=np.int32).reshape(8, 5),
           "loss_mask": np.ones((8, 5), np.float32)}
  out = data.to_global_batch(batch, NamedSharding(mesh, P("data")))
  assert out["inputs"].shape == (8, 5) and len(out["inputs"].addressable_shards) == 8
  assert out["inputs"].addressable_shards[3].data.tolist() == [[15, 16, 17, 18, 19]]
  np.testing.assert_array_equal(np.asarray(out["loss_mask"]), batch["loss_mask"])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_pretraining_windows_crlf_and_bad_letters(tmp_path, fragments):
  """FASTA edge cases of the readers are in test_seqfiles.py; these go through the windows."""
  # CRLF reads the same bases as LF.
  path, seqs = fragments
  crlf = tmp_path / "crlf.fa"
  crlf.write_bytes(pathlib.Path(path).read_bytes().replace(b"\n", b"\r\n"))
  name, seq = next(iter(seqs.items()))
  w = data.make_pretrain_windows(cfg_for(str(crlf)), split="train", seq_len=500)
  ex = w.example(3, None)
  ref, _ = reference_example(seq, w.intervals.start[3], w.intervals.end[3], 501,
                             hi=int(len(seq) * 0.95))
  np.testing.assert_array_equal(ex["inputs"], ref)
  bad = tmp_path / "bad.fa"
  bad.write_text(">a\nACGTAC\nAC*TAC\n")
  w = data.make_pretrain_windows(cfg_for(str(bad), valid_fraction=0.1), split="train", seq_len=4)
  with pytest.raises(ValueError, match=r"bad\.fa a:5-10.*'\*'"):
    w.example(1, None)


@pytest.mark.parametrize("row, message", [
    ("chrZ\t10\t20\ttrain", "chromosome 'chrZ' is not in the FASTA"),
    ("{c}\t50\t20\ttrain", "need 0 <= start < end"),
    ("{c}\t-5\t20\ttrain", "need 0 <= start < end"),
    ("{c}\t10\t99999999\ttrain", "past the end of"),
    ("{c}\t10", "got 2 column"),
    ("{c}\tten\t20\ttrain", "must be integers"),
    ("{c}\t10\t20", "no split column"),
    ("{c}\t10\t20\ttraining", "unknown split 'training' in the 4th column; use one of train, "
                              "valid, test"),
])
def test_bed_problems_name_file_and_line(fragments, tmp_path, row, message):
  path, seqs = fragments
  chrom = next(iter(seqs))
  bed = tmp_path / "bad.bed"
  bed.write_text(f"# comment\n{chrom}\t0\t100\ttrain\r\n\n" + row.format(c=chrom) + "\n")
  with pytest.raises(ValueError, match="bad.bed:4: .*" + re.escape(message)):
    genome.read_bed(bed, seqfiles.chrom_sizes(seqfiles.open_fasta(path)), "train")


def test_config_and_argument_errors(fragments):
  path, _ = fragments
  kw = dict(split="train", seq_len=64, global_batch_size=6, seed=0, process_index=0,
            process_count=1)
  cases = [(dict(process_count=4), "not divisible by the 4 processes"),
           (dict(seq_len=0), "seq_len must be an int >= 1"),
           (dict(split="test"), "defines only 'train' and 'valid'"),
           (dict(split="dev"), "split must be one of"),
           (dict(process_index=2, process_count=2), "must be < process_count")]
  for over, message in cases:
    with pytest.raises(ValueError, match=message):
      data.make_pretrain_dataset(cfg_for(path), **{**kw, **over})
  cfg = cfg_for(path)
  cfg.unlock()
  cfg.typo = 1
  with pytest.raises(ValueError, match=r"unknown keys \['typo'\]"):
    data.make_pretrain_dataset(cfg, **kw)
  with pytest.raises(ValueError, match="lowercase must be"):
    data.make_pretrain_dataset(cfg_for(path, lowercase="lower"), **kw)
  with pytest.raises(FileNotFoundError, match="BED file"):
    data.make_pretrain_dataset(cfg_for(path, "/nonexistent.bed"), **kw)


def test_akita_bed_splits():
  sizes = {}
  for line in shared_path("data", "intervals", "hg38.seqinfo.tsv").read_text().splitlines()[1:]:
    name, length = line.split("\t")[:2]
    sizes[name] = int(length)
  bed = shared_path("data", "intervals", "akita_sequences.hg38.bed")
  counts = {s: len(genome.read_bed(bed, sizes, s)) for s in genome.BED_SPLITS}
  assert sum(counts.values()) == len(bed.read_text().splitlines())
  assert min(counts.values()) > 0
  with pytest.raises(ValueError, match="splits present"):
    genome.read_bed(bed, sizes, "fold3")


# ---------------------------------------------------------------------------------------------
# Fine-tuning sources
# ---------------------------------------------------------------------------------------------


def test_genomic_benchmarks_tsv_and_encoding():
  path = shared_path("data", "genomic_benchmarks", "human_nontata_promoters.test.tsv")
  seqs, labels = labelled.read_labelled_sequences(path)
  lines = path.read_text().splitlines()
  assert len(seqs) == len(lines) - 1 and set(labels.tolist()) == {0, 1}
  assert seqs[5] == lines[6].split("\t")[0] and labels[5] == int(lines[6].split("\t")[1])
  split = labelled.read_split(str(path), max_length=260, n_classes=2)
  assert split.inputs.shape == (len(seqs), 260) and split.inputs.dtype == np.int32
  ref = [4] * (260 - len(seqs[0])) + [_REF_IDS[c] for c in seqs[0].upper()]
  np.testing.assert_array_equal(split.inputs[0], ref)  # left pad, no [SEP]
  assert not (split.inputs == tok.SEP).any()
  np.testing.assert_array_equal(split.labels, labels)
  with pytest.raises(InputError, match="exceeds data.max_length=100"):
    labelled.read_split(str(path), max_length=100, n_classes=2)
  cut = labelled.read_split(str(path), max_length=100, n_classes=2, truncate=True)
  assert cut.inputs[0].tolist() == [_REF_IDS[c] for c in seqs[0][:100].upper()]
  tr, te = labelled.split_train_test(len(seqs), 0.2, seed=1)
  tr2, te2 = labelled.split_train_test(len(seqs), 0.2, seed=1)
  assert np.array_equal(te, te2) and len(te) == round(0.2 * len(seqs))
  assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(seqs)))
  assert not np.array_equal(te, labelled.split_train_test(len(seqs), 0.2, seed=2)[1])
