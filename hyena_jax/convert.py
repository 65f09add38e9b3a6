"""Converts an official PyTorch HyenaDNA release into an orbax checkpoint of this project.

    python -m hyena_jax.convert --from=PATH --out=WORKDIR [--shift=0.05] [--pooling=mean]

PATH is a weights file or a directory holding one, with the official config.json beside it:
  * an HF "-hf" repository (`config.json` + `model.safetensors` or `pytorch_model.bin`),
  * an original repository / training output (`config.json` + `weights.ckpt`, Lightning, with or
    without the `.mixer.layer.` key level),
  * a standalone state dict (`weights.pt`, optionally with `head.output_transform.*`).
Without config.json the architecture is read off the tensor shapes. Torch pickles are read with
`torch.load(weights_only=True)`: no code stored in a file is ever run.

The result is `WORKDIR/checkpoints/0/{params,config}` with run config `{"model": ...}` (plus
`{"head": {"n_classes", "pooling"}}` for a classifier), which `checkpoint.restore_model`, the
fine-tuning job and `hyena_jax.export` read. `shift` is recorded in no official config: it is
0.05 (the standalone/-hf inference value) unless the config (our exports) or --shift says so.
"""

from __future__ import annotations

import os
import typing
from typing import Any

from hyena_jax import checkpoint
from hyena_jax import weights
from hyena_jax.errors import InputError, MissingInputError, OutputExistsError
from hyena_jax.model import Pooling

# Searched in this order inside a directory: safetensors first (exact and pickle-free).
WEIGHT_NAMES = ("model.safetensors", "weights.safetensors", "pytorch_model.bin", "weights.ckpt",
                "weights.pt", "last.ckpt")


def find_weights(path: str | os.PathLike) -> str:
  """The weights file `path` names, or the one inside directory `path`."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise MissingInputError(f"--from={path} does not exist")
  for name in WEIGHT_NAMES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise MissingInputError(f"no weights file in {path} (looked for {', '.join(WEIGHT_NAMES)}; "
                          f"found {sorted(os.listdir(path))[:10]}): pass the file itself as --from")


def convert(src: str | os.PathLike, workdir: str | os.PathLike, *, shift: float | None = None,
            pooling: str = "mean", config_path: str | os.PathLike | None = None,
            step: int = 0) -> tuple[str, dict[str, Any]]:
  """Loads an official checkpoint (any layout) and saves it as an orbax checkpoint.

  Everything is validated (keys, shapes, buffers, config) before anything is written.
  Returns (checkpoint step directory, run config).
  """
  if pooling not in typing.get_args(Pooling):
    raise InputError(f"pooling must be one of {typing.get_args(Pooling)}, got {pooling!r}")
  path = find_weights(src)
  existing = os.path.join(checkpoint.checkpoint_dir(os.fspath(workdir)), str(step))
  if os.path.exists(existing):  # checked again by save_model; failing early skips the load
    raise OutputExistsError(f"{existing} already exists; choose another --out or --step")
  if config_path is None:
    beside = os.path.join(os.path.dirname(path), "config.json")
    config_path = beside if os.path.isfile(beside) else None
  model, cfg, layout = weights.load_pretrained(path, config_path=config_path, shift=shift)
  run_config: dict[str, Any] = {"model": cfg.to_dict()}
  n_classes = getattr(model, "n_classes", 0)
  if n_classes:
    run_config["head"] = {"n_classes": int(n_classes), "pooling": pooling}
  out = checkpoint.save_model(os.fspath(workdir), model, run_config, step=step)
  return out, run_config


if __name__ == "__main__":
  from absl import app, flags, logging

  flags.DEFINE_string("from", None, "Official weights file, or a directory holding one and "
                      "config.json.", required=True)
  flags.DEFINE_string("out", None, "Run directory to create checkpoints/<step>/ in.",
                      required=True)
  flags.DEFINE_float("shift", None, "Filter-modulation shift; default: the config's, else 0.05.")
  flags.DEFINE_enum("pooling", "mean", list(typing.get_args(Pooling)),
                    "Pooling of a classification head (official configs do not record it).")
  flags.DEFINE_string("config", None, "config.json to use instead of the one beside the weights.")
  flags.DEFINE_integer("step", 0, "Step number of the written checkpoint.")
  FLAGS = flags.FLAGS

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out, run_config = convert(getattr(FLAGS, "from"), FLAGS.out, shift=FLAGS.shift,
                              pooling=FLAGS.pooling, config_path=FLAGS.config, step=FLAGS.step)
    logging.info("run config: %s", run_config)
    print(out)

  from hyena_jax import cli
  cli.run(main)
