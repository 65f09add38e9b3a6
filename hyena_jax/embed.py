r"""Embeddings of DNA sequences (`hyena_jax.inference.embed`) from the command line.

    python -m hyena_jax.embed --model=SOURCE --input=seqs.fa --output=emb.npz \
        [--layers=final,0] [--pooling=mean|mean_nonpad|sum|first|last] [--per_position]
        [--batch_size=8] [--add_eos] [--truncate] [--pad_to=N]

SOURCE is anything `hyena_jax.load` reads (orbax run with --step, official file or folder, Hub
repo id with --revision). The output's arrays are described in `hyena_jax.inference.embed`.
"""

from absl import app, flags, logging

from hyena_jax import cli, tool_flags
from hyena_jax.inference import embed

_MODEL = tool_flags.define_model_flags()
_INPUT = flags.DEFINE_string("input", None, "FASTA (.fa/.fasta/.fna[.gz]) or TSV/CSV file")
_OUTPUT = flags.DEFINE_string("output", None, "output .npz (or .npy + .index.npz)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "sequences per forward pass")
_LAYERS = flags.DEFINE_list("layers", ["final"], "'final' and/or block indices (0-based)")
_POOLING = flags.DEFINE_enum("pooling", "mean", embed.POOLINGS, "pooling of per-sequence "
                             "embeddings")
_PER_POSITION = flags.DEFINE_bool("per_position", False, "write one vector per token instead")
_ADD_EOS = flags.DEFINE_bool("add_eos", False, "append [SEP] as the -hf tokenizer does")
_TRUNCATE = flags.DEFINE_bool("truncate", False, "keep the first bases of overlong sequences")
_PAD_TO = flags.DEFINE_integer("pad_to", None, "left-pad to this length (official fine-tuning "
                               "input)")
_SEQUENCE_INPUT = tool_flags.define_sequence_input_flags()
_MAX_MEMORY = tool_flags.define_max_memory_flag()
flags.adopt_module_key_flags(cli)
flags.adopt_module_key_flags(tool_flags)
cli.mark_required(["model", "input", "output"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  model = tool_flags.load_model(_MODEL).model
  summary = embed.embed_file(model, _INPUT.value, _OUTPUT.value,
                             **tool_flags.sequence_input(_SEQUENCE_INPUT), layers=_LAYERS.value,
                             pooling=_POOLING.value, per_position=_PER_POSITION.value,
                             batch_size=_BATCH_SIZE.value, add_eos=_ADD_EOS.value,
                             truncate=_TRUNCATE.value, pad_to=_PAD_TO.value,
                             max_memory_gb=_MAX_MEMORY.value)
  logging.info("embedded %d records (%d tokens)", summary["records"], summary["tokens"])
  print(f"wrote {summary['shape']} to {', '.join(summary['outputs'])}")


if __name__ == "__main__":
  cli.run(main)
