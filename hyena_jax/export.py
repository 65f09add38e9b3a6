r"""Exports a model to the official PyTorch HyenaDNA formats (`hyena_jax.interop.export`).

    python -m hyena_jax.export --model=SOURCE [--step=N] --output=DIR \
        [--layout=hf|lightning|standalone]

SOURCE is anything `hyena_jax.load` reads: an orbax run (--step, default the latest), an
official weights file or folder, or a Hub repo id (--revision).
"""

from absl import app, flags, logging

from hyena_jax import cli, tool_flags
from hyena_jax.interop import export, formats, weights

_MODEL = tool_flags.define_model_flags()
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (must not exist unless --overwrite).")
_LAYOUT = flags.DEFINE_enum("layout", "hf", weights.LAYOUTS, "hf: model.safetensors + -hf "
                            "config.json; lightning: weights.ckpt; standalone: weights.pt "
                            "(standalone_hyenadna).")
_HEAD = flags.DEFINE_bool("head", True, "Export a classifier's head (--nohead: the backbone only, "
                          "as a language model with the tied embedding head).")
_CHECKPOINT_MIXER = flags.DEFINE_bool("checkpoint_mixer", False, "lightning only: "
                                      "`.mixer.layer.`/`.mlp.layer.` keys, as models trained "
                                      "with activation checkpointing.")
_REMOTE_CODE_REPO = flags.DEFINE_string("remote_code_repo", formats.DEFAULT_REMOTE_CODE,
                                        "hf only: Hub repository whose modeling_hyena.py the "
                                        "auto_map points to.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Write into an existing --output folder, "
                               "replacing only the files export writes (weights, config.json); "
                               "other files stay.")
flags.adopt_module_key_flags(cli)
flags.adopt_module_key_flags(tool_flags)
cli.mark_required(["model", "output"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = export.export(_MODEL.model.value, _OUTPUT.value, _MODEL.step.value, _LAYOUT.value,
                      include_head=_HEAD.value, checkpoint_mixer=_CHECKPOINT_MIXER.value,
                      remote_code_repo=_REMOTE_CODE_REPO.value, overwrite=_OVERWRITE.value,
                      revision=_MODEL.revision.value, shift=_MODEL.shift.value)
  logging.info("wrote %s", out)
  print(out)


if __name__ == "__main__":
  cli.run(main)
