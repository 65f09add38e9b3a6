"""hyena_jax.seqfiles: one test per file-format edge case, each naming the file and line."""

import gzip
import os

import pytest

from hyena_jax.data import labelled, seqfiles, variants
from hyena_jax.errors import InputError, MissingInputError


def _write(path, text):
  path.write_text(text)
  return str(path)


def _truncated_gz(path, text: str):
  blob = gzip.compress(text.encode())
  path.write_bytes(blob[:len(blob) // 2])
  return str(path)


def _names_seqs(records):
  return [(r.name, r.seq) for r in records]


# ------------------------------------------------------------------------------------------------
# Text: gzip by content, binary, truncated


def test_gzip_is_told_by_magic_bytes_not_suffix(tmp_path):
  gz_named_fa = tmp_path / "a.fa"
  gz_named_fa.write_bytes(gzip.compress(b">r1\nACGT\n"))
  plain_named_gz = _write(tmp_path / "b.fa.gz", ">r2\nGG\n")
  assert _names_seqs(seqfiles.read_fasta(gz_named_fa)) == [("r1", "ACGT")]
  assert _names_seqs(seqfiles.read_fasta(plain_named_gz)) == [("r2", "GG")]
  assert seqfiles.compression(gz_named_fa) == "gzip"


def test_truncated_gzip_names_the_file_in_every_reader(tmp_path):
  fa_gz = _truncated_gz(tmp_path / "x.fa.gz", "".join(f">r{i}\n{'ACGT' * 50}\n" for i in range(200)))
  pattern = r"x\.fa\.gz:\d+: the gzip data is damaged or truncated"
  with pytest.raises(InputError, match=pattern):
    list(seqfiles.read_fasta(fa_gz))              # embed / score --input / generate
  with pytest.raises(InputError, match=pattern):
    variants.ReferenceGenome(fa_gz)                        # score --fasta
  with pytest.raises(InputError, match=pattern):
    labelled.read_labelled_fasta(fa_gz, _write(tmp_path / "l.tsv", "r0\t1\n"))
  tsv_gz = _truncated_gz(tmp_path / "t.tsv.gz", "".join(f"{'ACGT' * 50}\t1\n" for _ in range(300)))
  with pytest.raises(InputError, match=r"t\.tsv\.gz:\d+: the gzip data is damaged"):
    labelled.read_labelled_sequences(tsv_gz)      # finetune TSV
  with pytest.raises(InputError, match=r"t\.tsv\.gz:\d+: the gzip data is damaged"):
    list(seqfiles.read_table(tsv_gz))             # embed / score table


def test_nul_bytes_name_the_line(tmp_path):
  tsv = tmp_path / "train.tsv"
  tsv.write_bytes(b"ACGT\t1\n\x00\x01\x02\x03\t0\n")
  with pytest.raises(InputError, match=r"train\.tsv:2: contains NUL bytes: a binary file"):
    labelled.read_labelled_sequences(str(tsv))


def test_binary_fasta_for_pyfaidx_names_the_line_and_leaves_no_index(tmp_path):
  path = tmp_path / "data.fasta"
  path.write_bytes(b">chr1\nACGT\n" + bytes(range(128, 256)) + b"\n")
  with pytest.raises(InputError, match=r"data\.fasta:3: not a text FASTA file"):
    seqfiles.open_fasta(str(path))
  assert not (tmp_path / "data.fasta.fai").exists()


def test_missing_files_are_missing_input_errors(tmp_path):
  missing = tmp_path / "nope.fa"
  for read in (lambda: list(seqfiles.read_fasta(missing)), lambda: seqfiles.open_fasta(missing),
               lambda: list(seqfiles.read_table(missing)), lambda: list(variants.read_vcf(missing)),
               lambda: labelled.read_labelled_sequences(missing), lambda: variants.ReferenceGenome(missing)):
    with pytest.raises(MissingInputError, match="nope.fa"):
      read()


def test_a_fifo_a_folder_or_a_device_is_not_a_regular_file(tmp_path):
  """They exist, so "not found" would be wrong; a streamed reader would block on a FIFO or read
  /dev/zero forever."""
  os.mkfifo(tmp_path / "pipe.fa")
  (tmp_path / "zero.fa").symlink_to("/dev/zero")
  (tmp_path / "folder.fa").mkdir()
  for name, what in (("pipe.fa", "a FIFO"), ("zero.fa", "a device or special file"),
                     ("folder.fa", "a folder")):
    path = tmp_path / name
    for read in (lambda: list(seqfiles.read_fasta(path)), lambda: seqfiles.open_fasta(path),
                 lambda: list(seqfiles.read_table(path)), lambda: list(variants.read_vcf(path)),
                 lambda: variants.ReferenceGenome(path)):
      with pytest.raises(InputError, match=f"{name} is {what}, not a regular file"):
        read()


# ------------------------------------------------------------------------------------------------
# FASTA


def test_fasta_any_line_width_crlf_and_comment_lines(tmp_path):
  path = tmp_path / "w.fa"
  path.write_bytes(b">r1 description\r\nAC\r\nGTA\r\n;a comment\r\n\r\n>r2\r\nacgt\r\n")
  records = list(seqfiles.read_fasta(path))
  assert _names_seqs(records) == [("r1", "ACGTA"), ("r2", "acgt")]
  assert [r.line for r in records] == [1, 6]
  assert records[1].where == f"{path}:6 (record 'r2')"


def test_duplicate_fasta_names_are_refused_in_every_reader(tmp_path):
  path = tmp_path / "ref.fa"
  path.write_text(">chr1\nACGTACGT\n>chr2\nGGGG\n>chr1 again\nTTTTTTTT\n")
  message = r"ref\.fa:5: FASTA record name 'chr1' is used again \(first at line 1\)"
  with pytest.raises(InputError, match=message):
    variants.ReferenceGenome(str(path))                    # score --fasta
  with pytest.raises(InputError, match=message):
    list(seqfiles.read_fasta(str(path)))          # embed / score / generate / finetune
  with pytest.raises(InputError, match=r"ref\.fa:5: FASTA record name 'chr1' appears more than "
                                       "once"):
    seqfiles.open_fasta(str(path))                # pretraining (pyfaidx)
  assert not (tmp_path / "ref.fa.fai").exists()


def test_fasta_record_without_sequence(tmp_path):
  fa = _write(tmp_path / "bad.fa", ">empty\n>next\nACGT\n")
  with pytest.raises(InputError, match=r"bad\.fa:1 \(record 'empty'\): record has no sequence"):
    list(seqfiles.read_fasta(fa))
  with pytest.raises(InputError, match=r"bad\.fa:1: FASTA record 'empty' is empty"):
    seqfiles.open_fasta(fa)


def test_fasta_text_before_the_first_header(tmp_path):
  fa = _write(tmp_path / "h.fa", "ACGT\n>a\nACGT\n")
  with pytest.raises(InputError, match=r"h\.fa:1: text before the first '>'"):
    list(seqfiles.read_fasta(fa))
  with pytest.raises(InputError, match="line 1"):
    seqfiles.open_fasta(fa)


def test_fasta_header_without_a_name(tmp_path):
  with pytest.raises(InputError, match=r"n\.fa:3: FASTA header without a name"):
    list(seqfiles.read_fasta(_write(tmp_path / "n.fa", ">a\nAC\n>  \nGG\n")))


def test_plain_gzip_cannot_be_indexed(tmp_path):
  gz = tmp_path / "g.fa.gz"
  gz.write_bytes(gzip.compress(b">a\nACGT\n"))
  with pytest.raises(InputError, match="plain gzip.*gunzip -k"):
    seqfiles.open_fasta(gz)
  genome = variants.ReferenceGenome(gz)                    # read in memory instead
  assert genome.names == ["a"] and genome.fetch("a", 1, 3) == "CG"


def test_genome_is_upper_case_in_memory_and_indexed(tmp_path):
  fa = _write(tmp_path / "g.fa", ">c\nacgtACGT\nnnAA\n")
  in_memory = variants.ReferenceGenome(fa)
  indexed = variants.ReferenceGenome(fa, in_memory_bytes=0)   # pyfaidx path
  for genome in (in_memory, indexed):
    assert genome.length("c") == 12 and genome.fetch("c", 2, 10) == "GTACGTNN"
    assert "c" in genome and "d" not in genome
  assert (tmp_path / "g.fa.fai").exists()


# ------------------------------------------------------------------------------------------------
# Tables: the one header rule


def test_table_header_by_known_column_names(tmp_path):
  table = _write(tmp_path / "s.tsv", "id\tseq\nr1\tACGT\n")
  records = list(seqfiles.read_table(table, 1, name_column=0))
  assert _names_seqs(records) == [("r1", "ACGT")] and records[0].line == 2
  assert _names_seqs(seqfiles.read_table(table, "seq", name_column="id")) == [("r1", "ACGT")]
  with pytest.raises(InputError, match="no column named 'sequence'"):
    list(seqfiles.read_table(table, "sequence"))


def test_table_unknown_header_is_refused_not_guessed(tmp_path):
  table = _write(tmp_path / "s.tsv", "gene\tdna_seq\nr1\tACGT\n")
  with pytest.raises(InputError, match=r"s\.tsv:1: 'dna_seq' is neither DNA nor a column name"):
    list(seqfiles.read_table(table, 1))


def test_table_without_header_keeps_line_one(tmp_path):
  table = _write(tmp_path / "s.txt", "ACGT\nGG\n")
  assert [r.seq for r in seqfiles.read_table(table)] == ["ACGT", "GG"]
  assert [r.name for r in seqfiles.read_table(table)] == ["row1", "row2"]


def test_labelled_table_without_header_never_drops_a_row(tmp_path):
  tsv = tmp_path / "x.tsv"
  tsv.write_text("ACGT\tyes\nGGCC\t1\n")  # header-less, first label not a number
  with pytest.raises(InputError, match=r"x\.tsv:1: label 'yes' is not an integer class id; line "
                                       r"1 was read as data because a header row must name"):
    labelled.read_labelled_sequences(str(tsv))
  tsv.write_text("ACGT\t1\nGGCC\t0\n")
  seqs, labels = labelled.read_labelled_sequences(str(tsv))
  assert seqs == ["ACGT", "GGCC"] and labels.tolist() == [1, 0]


def test_labelled_table_header_finds_columns_by_name(tmp_path):
  tsv = _write(tmp_path / "x.tsv", "label\tSequence\n1\tACGT\n0\tGGCC\n")
  seqs, labels, lines = labelled.read_labelled_sequences(tsv, return_lines=True)
  assert seqs == ["ACGT", "GGCC"] and labels.tolist() == [1, 0] and lines.tolist() == [2, 3]


def test_same_file_parses_the_same_in_finetune_and_embed(tmp_path):
  """The issue's bug: one GenomicBenchmarks-style TSV, two header rules. Now one."""
  tsv = _write(tmp_path / "gb.tsv", "seq\tlabel\nACGT\t1\nGGCC\t0\n")
  seqs, _ = labelled.read_labelled_sequences(tsv)
  assert [r.seq for r in seqfiles.read_table(tsv)] == seqs == ["ACGT", "GGCC"]


def test_csv_crlf_without_header(tmp_path):
  csv = _write(tmp_path / "x.csv", "ACGT,1\r\nggNN,0\r\n")
  seqs, labels = labelled.read_labelled_sequences(csv)
  assert seqs == ["ACGT", "ggNN"] and labels.tolist() == [1, 0]
  assert [r.seq for r in seqfiles.read_table(csv)] == ["ACGT", "ggNN"]


@pytest.mark.parametrize("body, message", [
    ("seq\tlabel\nACGT\tx\n", r"x.tsv:2: label 'x'"),
    ("seq\tlabel\nACGT\t1\nAC-T\t0\n", r"x.tsv:3: invalid character"),
    ("ACGT\t1\nACGT\n", r"x.tsv:2: expected"),
    ("ACGT\t-1\n", r"x.tsv:1: label -1 is negative"),
    ("seq\tlabel\n", "no labelled sequences"),
])
def test_labelled_table_problems(tmp_path, body, message):
  with pytest.raises(InputError, match=message):
    labelled.read_labelled_sequences(_write(tmp_path / "x.tsv", body))


def test_regression_labels_must_be_finite(tmp_path):
  seqs, labels = labelled.read_labelled_sequences(_write(tmp_path / "r.tsv", "AC\t0.5\n"),
                                                  float_labels=True)
  assert labels.dtype.name == "float32" and labels.tolist() == [0.5]
  with pytest.raises(InputError, match=r"r\.tsv:1: label 'inf' is not finite"):
    labelled.read_labelled_sequences(_write(tmp_path / "r.tsv", "AC\tinf\n"), float_labels=True)


# ------------------------------------------------------------------------------------------------
# FASTA + labels


def test_labelled_fasta_matches_labels_by_name(tmp_path):
  fa = _write(tmp_path / "s.fa", ">r1 x\nACGT\nAC\n>r2\nTTTT\n")
  lab = _write(tmp_path / "s.labels", "name\tlabel\nr2\t1\nr1\t0\n")
  seqs, labels, lines = labelled.read_labelled_fasta(fa, lab, return_lines=True)
  assert seqs == ["ACGTAC", "TTTT"] and labels.tolist() == [0, 1] and lines.tolist() == [1, 4]


def test_labelled_fasta_record_without_label(tmp_path):
  fa = _write(tmp_path / "s.fa", ">r1\nACGT\n>r2\nTTTT\n")
  with pytest.raises(InputError, match=r"s.fa:3: record 'r2' has no label"):
    labelled.read_labelled_fasta(fa, _write(tmp_path / "s.labels", "r1\t0\n"))


def test_labelled_fasta_duplicate_label(tmp_path):
  fa = _write(tmp_path / "s.fa", ">r1\nACGT\n")
  with pytest.raises(InputError, match=r"s.labels:2: duplicate label for 'r1'"):
    labelled.read_labelled_fasta(fa, _write(tmp_path / "s.labels", "r1\t0\nr1\t1\n"))


def test_labelled_fasta_invalid_letters(tmp_path):
  fa = _write(tmp_path / "s.fa", ">r1\nAC*T\n")
  with pytest.raises(InputError, match=r"s\.fa:1 \(record 'r1'\): invalid character\(s\) \['\*'\]"):
    labelled.read_labelled_fasta(fa, _write(tmp_path / "s.labels", "r1\t0\n"))


# ------------------------------------------------------------------------------------------------
# VCF


def test_vcf_multi_allelic_gives_one_variant_per_allele(tmp_path):
  vcf = _write(tmp_path / "v.vcf", "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\n\n"
                                   "chr1\t10\trs1\ta\tG,TT\n")
  got = [(v.chrom, v.pos, v.id, v.ref, v.alt, v.where) for v in variants.read_vcf(vcf)]
  assert got == [("chr1", 10, "rs1", "A", "G", f"{vcf}:4"), ("chr1", 10, "rs1", "A", "TT", f"{vcf}:4")]


@pytest.mark.parametrize("line, message", [
    ("chrA\t10\t.\tA\t<DEL>", r"v\.vcf:2: ALT '<DEL>' is not supported"),
    ("chrA\t10\t.\tA\t*", r"v\.vcf:2: ALT '\*' is not supported"),
    ("chrA\t10\tA\tG", r"v\.vcf:2: expected at least 5 columns"),
    ("chrA\tten\t.\tA\tG", r"v\.vcf:2: POS 'ten' is not an integer"),
    ("chrA\t0\t.\tA\tG", r"v\.vcf:2: POS must be 1-based"),
    ("chrA\t5\t.\tR\tG", r"v\.vcf:2: REF 'R' must be bases"),
])
def test_vcf_problems_name_the_line(tmp_path, line, message):
  vcf = _write(tmp_path / "v.vcf", "#CHROM\tPOS\tID\tREF\tALT\n" + line + "\n")
  with pytest.raises(InputError, match=message):
    list(variants.read_vcf(vcf))


def test_format_by_suffix(tmp_path):
  with pytest.raises(InputError, match="cannot tell the format of .*x.bam .*: name it on the "
                     "command line with --format=fasta or --format=table"):
    seqfiles.read_sequences(_write(tmp_path / "x.bam", ""))
  fasta = _write(tmp_path / "x.dat", ">a\nACGT\n")
  assert [r.seq for r in seqfiles.read_sequences(fasta, fmt="fasta")] == ["ACGT"]
  table = _write(tmp_path / "x.tsv.gz", "ACGT\n")
  assert [r.seq for r in seqfiles.read_sequences(table)] == ["ACGT"]  # plain, despite .gz
