#!/usr/bin/env bash
# Downloads and prepares HyenaDNA's pretraining data: the hg38 genome and its split BED.
#
#   launch/prepare_hg38.sh [DEST]          # DEST defaults to data/hg38
#
# Files (the public locations the official HyenaDNA README uses; Basenji's barnyard bucket):
#   hg38.ml.fa.gz          -> DEST/hg38.ml.fa (about 3.1 GB, decompressed: pyfaidx cannot index
#                             plain gzip) + DEST/hg38.ml.fa.fai
#   sequences_human.bed    -> DEST/human-sequences.bed (`chrom start end split`, 131,072-bp rows)
# Needs curl, gzip, python with hyena_jax installed; about 4 GB of disk. Safe to re-run: finished
# steps are skipped, downloads resume. Set HG38_BASE_URL to use a mirror.
#
# Then train with:
#   --config.data.fasta=DEST/hg38.ml.fa --config.data.bed=DEST/human-sequences.bed
set -euo pipefail

DEST="${1:-data/hg38}"
BASE_URL="${HG38_BASE_URL:-https://storage.googleapis.com/basenji_barnyard2}"
PYTHON="${PYTHON:-python}"

mkdir -p "$DEST"
FASTA="$DEST/hg38.ml.fa"
BED="$DEST/human-sequences.bed"

fetch() {  # fetch URL OUT: resumable download into OUT.part, renamed when complete
  local url="$1" out="$2"
  if [[ -s "$out" ]]; then echo "have $out"; return; fi
  echo "downloading $url"
  curl --fail --location --retry 5 --continue-at - --output "$out.part" "$url"
  mv "$out.part" "$out"
}

if [[ ! -s "$FASTA" ]]; then
  fetch "$BASE_URL/hg38.ml.fa.gz" "$FASTA.gz"
  echo "decompressing $FASTA.gz"
  gzip --decompress --stdout "$FASTA.gz" > "$FASTA.part"
  mv "$FASTA.part" "$FASTA"
  rm -f "$FASTA.gz" "$FASTA.fai"
else
  echo "have $FASTA"
fi
fetch "$BASE_URL/sequences_human.bed" "$BED"

# Build the .fai index and check that every BED row lies on the genome (errors name the line).
"$PYTHON" - "$FASTA" "$BED" <<'EOF'
import sys
from hyena_jax import genome, seqfiles

fasta_path, bed_path = sys.argv[1:3]
fasta = seqfiles.open_fasta(fasta_path)
sizes = seqfiles.chrom_sizes(fasta)
print(f"{fasta_path}: {len(sizes)} records, {sum(sizes.values()):,} bp, index {fasta_path}.fai")
for split in genome.BED_SPLITS:
  print(f"{bed_path}: {len(genome.read_bed(bed_path, sizes, split)):,} {split} intervals")
EOF

echo "done: --config.data.fasta=$FASTA --config.data.bed=$BED"
