r"""Fine-tunes a pretrained model on a labelled sequence task (`hyena_jax.downstream.finetune`).

    python -m hyena_jax.finetune --config=configs/finetune.py:human_enhancers_cohn \
        --model=LongSafari/hyenadna-tiny-1k-seqlen-hf --workdir=runs/cohn

Running the same command again resumes an interrupted run. Exit status: 0 when finished; 128 +
the signal's number when SIGTERM or Ctrl-C stopped it after saving.
"""

import signal
import sys

from absl import app, flags

from hyena_jax import cli, tool_flags
from hyena_jax.downstream import finetune

_CONFIG, _WORKDIR = tool_flags.define_tuning_flags(
    "Fine-tuning config, e.g. configs/finetune.py:human_enhancers_cohn[:small_data]",
    "Where checkpoints, metrics and results.json go.")
flags.adopt_module_key_flags(cli)
flags.adopt_module_key_flags(tool_flags)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = finetune.finetune_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.get("status") == "interrupted":  # saved; rerun the same command to resume
    sys.exit(128 + signal.Signals[result.get("signal", "SIGTERM")].value)


if __name__ == "__main__":
  cli.run(main)
