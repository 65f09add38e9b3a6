"""In-context learning of a labelled task with a pretrained language model
(`hyena_jax.downstream.icl`): soft prompts (LM frozen) or instruction tuning.

    python -m hyena_jax.icl --config=configs/icl.py:soft_prompt --workdir=runs/icl
"""

from absl import app, flags

from hyena_jax import cli, tool_flags
from hyena_jax.downstream import icl

_CONFIG, _WORKDIR = tool_flags.define_tuning_flags(
    "ICL config, e.g. configs/icl.py:soft_prompt",
    "Where metrics, results.json and tuned weights go.")
flags.adopt_module_key_flags(cli)
flags.adopt_module_key_flags(tool_flags)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  icl.icl_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
