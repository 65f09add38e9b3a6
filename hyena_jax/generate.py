r"""Sampling continuations of a DNA prompt (`hyena_jax.inference.generate`) from the command line.

    python -m hyena_jax.generate --model=SOURCE --prompt=ACGTTGCA --num_new=200 \
        [--num_samples=4] [--temperature=1.0] [--top_k=0] [--seed=0] [--allow_n] \
        [--method=cached|recompute] [--output=samples.fa]

SOURCE is anything `hyena_jax.load` reads (orbax run with --step, official file or folder, Hub
repo id with --revision).
"""

from absl import app, flags, logging

from hyena_jax import cli, tool_flags
from hyena_jax.data import seqfiles
from hyena_jax.errors import InputError
from hyena_jax.inference import generate

_MODEL = tool_flags.define_model_flags()
_PROMPT = flags.DEFINE_string("prompt", None, "DNA prompt")
_PROMPT_FASTA = flags.DEFINE_string("prompt_fasta", None, "FASTA of prompts (one generation per "
                                    "record)")
_NUM_NEW = flags.DEFINE_integer("num_new", 100, "bases to generate per sample")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "samples per prompt")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "softmax temperature; 0 = greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample among the k most likely bases (0 = all)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed (same seed, same samples)")
_ALLOW_N = flags.DEFINE_bool("allow_n", False, "also sample N")
_METHOD = flags.DEFINE_enum("method", "cached", ["cached", "recompute"], "decoder (see "
                            "hyena_jax.inference.generate)")
_OUTPUT = flags.DEFINE_string("output", None, "FASTA to write (default: stdout)")
flags.adopt_module_key_flags(cli)
flags.adopt_module_key_flags(tool_flags)
cli.mark_required(["model"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if (_PROMPT.value is None) == (_PROMPT_FASTA.value is None):
    raise app.UsageError("pass exactly one of --prompt or --prompt_fasta")
  model = tool_flags.load_model(_MODEL).model
  prompts = ([("prompt", _PROMPT.value)] if _PROMPT.value is not None else
             [(r.name, r.seq) for r in seqfiles.read_fasta(_PROMPT_FASTA.value)])
  lines = []
  for name, prompt in prompts:
    try:
      result = generate.generate(model, prompt, _NUM_NEW.value, num_samples=_NUM_SAMPLES.value,
                                 temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                 seed=_SEED.value, allow_n=_ALLOW_N.value, method=_METHOD.value)
    except InputError:
      raise
    except ValueError as e:  # generate() checks its arguments, which are these flags
      where = f"{_PROMPT_FASTA.value} (record {name!r}): " if _PROMPT_FASTA.value else ""
      raise InputError(f"{where}{e}") from e
    for i, seq in enumerate(result.sequences):
      lines += [f">{name}_sample{i} seed={_SEED.value} temperature={_TEMPERATURE.value} "
                f"top_k={_TOP_K.value}", seq]
  text = "\n".join(lines) + "\n"
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text)
    logging.info("wrote %d samples to %s", len(lines) // 2, _OUTPUT.value)
  else:
    print(text, end="")


if __name__ == "__main__":
  cli.run(main)
