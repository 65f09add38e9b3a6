r"""Log-likelihoods of sequences, or of variants against a reference, from the command line
(`hyena_jax.inference.score`).

    python -m hyena_jax.score --model=SOURCE --input=seqs.fa --output=scores.npz|.tsv
    python -m hyena_jax.score --model=SOURCE --vcf=calls.vcf --fasta=ref.fa --output=llr.tsv \
        [--window=N]

SOURCE is anything `hyena_jax.load` reads (orbax run with --step, official file or folder, Hub
repo id with --revision).
"""

from absl import app, flags, logging

from hyena_jax import cli, tool_flags
from hyena_jax.inference import score

_MODEL = tool_flags.define_model_flags()
_INPUT = flags.DEFINE_string("input", None, "sequences to score: FASTA or TSV/CSV")
_VCF = flags.DEFINE_string("vcf", None, "variants to score (VCF: CHROM POS ID REF ALT ...)")
_FASTA = flags.DEFINE_string("fasta", None, "reference FASTA for --vcf (plain, or gzip read in "
                             "memory)")
_OUTPUT = flags.DEFINE_string("output", None, "--input: .npz (per base) or .tsv; --vcf: .tsv")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "sequences per forward pass")
_WINDOW = flags.DEFINE_integer("window", None, "--vcf: reference bases around REF (default "
                               "min(1024, l_max), fitted to each allele)")
_CONTEXT_TOKEN = flags.DEFINE_integer("context_token", None, "token prepended so the first base "
                                      "is scored (e.g. 1 = [SEP]); default: first base unscored")
_TRUNCATE = flags.DEFINE_bool("truncate", False, "--input: keep the first bases of overlong "
                              "sequences")
_SEQUENCE_INPUT = tool_flags.define_sequence_input_flags()
_MAX_MEMORY = tool_flags.define_max_memory_flag()
flags.adopt_module_key_flags(cli)
flags.adopt_module_key_flags(tool_flags)
cli.mark_required(["model", "output"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_INPUT.value is None) == (_VCF.value is None):
    raise app.UsageError("pass exactly one of --input (sequences) or --vcf (with --fasta)")
  if _VCF.value is not None and _FASTA.value is None:
    raise app.UsageError("--vcf needs --fasta, the reference the variants are called against")
  model = tool_flags.load_model(_MODEL).model
  if _VCF.value is not None:
    summary = score.score_vcf_file(model, _VCF.value, _FASTA.value, _OUTPUT.value,
                                   window=_WINDOW.value, batch_size=_BATCH_SIZE.value,
                                   context_token=_CONTEXT_TOKEN.value)
  else:
    summary = score.score_file(model, _INPUT.value, _OUTPUT.value,
                               **tool_flags.sequence_input(_SEQUENCE_INPUT),
                               context_token=_CONTEXT_TOKEN.value, truncate=_TRUNCATE.value,
                               batch_size=_BATCH_SIZE.value,
                               max_memory_gb=_MAX_MEMORY.value)
  logging.info("%s", summary)
  print(f"wrote {', '.join(summary['outputs'])}")


if __name__ == "__main__":
  cli.run(main)
