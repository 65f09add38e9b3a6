"""Converts a model into an orbax run of this project (`hyena_jax.interop.convert`).

    python -m hyena_jax.convert --model=SOURCE --output=WORKDIR [--shift=0.05] [--pooling=mean]

SOURCE is an official release as `hyena_jax.load` reads it: a weights file or a folder holding
one, or a Hub repo id (--revision).
"""

import typing

from absl import app, flags, logging

from hyena_jax import cli
from hyena_jax.interop import convert
from hyena_jax.model.hyenadna import Pooling

_MODEL = flags.DEFINE_string("model", None, "Official weights file, a folder holding one and "
                             "config.json, or a Hub repo id (see hyena_jax.load).")
_REVISION = flags.DEFINE_string("revision", None, "Hub repo id: branch, tag or commit (default: "
                                "main)")
_SHIFT = flags.DEFINE_float("shift", None, "Filter-modulation shift; default: the config's, else "
                            "0.05.")
_CONFIG_JSON = flags.DEFINE_string("config_json", None, "Official config.json to use instead of "
                                   "the one beside the weights.")
_POOLING = flags.DEFINE_enum("pooling", "mean", list(typing.get_args(Pooling)),
                             "Pooling of a classification head (official configs do not record "
                             "it).")
_OUTPUT = flags.DEFINE_string("output", None, "Run folder to create checkpoints/<save_step>/ in.")
_SAVE_STEP = flags.DEFINE_integer("save_step", 0, "Step number of the written checkpoint.")
flags.adopt_module_key_flags(cli)
cli.mark_required(["model", "output"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out, run_config = convert.convert(_MODEL.value, _OUTPUT.value, shift=_SHIFT.value,
                                    pooling=_POOLING.value, config_path=_CONFIG_JSON.value,
                                    step=_SAVE_STEP.value, revision=_REVISION.value)
  logging.info("run config: %s", run_config)
  print(out)


if __name__ == "__main__":
  cli.run(main)
