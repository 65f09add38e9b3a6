"""Converts an official PyTorch HyenaDNA release into an orbax checkpoint of this project.

    python -m hyena_jax.convert --model=PATH --output=WORKDIR [--shift=0.05] [--pooling=mean]

(--from, --out, --config and --step are the deprecated names of --model, --output,
--config_json and --save_step.)

PATH is a Hub repo id, a weights file or a directory holding one (see `hyena_jax.load`), with
the official config.json beside it:
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
from hyena_jax import loading, storage
from hyena_jax.errors import InputError, OutputExistsError
from hyena_jax.model import Pooling


def convert(src: str | os.PathLike, workdir: str | os.PathLike, *, shift: float | None = None,
            pooling: str = "mean", config_path: str | os.PathLike | None = None,
            step: int = 0) -> tuple[str, dict[str, Any]]:
  """Loads an official checkpoint (any layout) and saves it as an orbax checkpoint.

  Everything is validated (keys, shapes, buffers, config) before anything is written.
  Returns (checkpoint step directory, run config).
  """
  if pooling not in typing.get_args(Pooling):
    raise InputError(f"pooling must be one of {typing.get_args(Pooling)}, got {pooling!r}")
  storage.check_access(workdir, "--output")
  # A converted checkpoint starts a new run: added to an existing one it would sit among steps of
  # another architecture (and orbax silently skips a step older than the latest).
  held = checkpoint.latest_step(os.fspath(workdir))
  if held is not None:
    raise OutputExistsError(f"{checkpoint.checkpoint_dir(os.fspath(workdir))} already holds "
                            f"checkpoints (latest step {held}): convert writes a new run; choose "
                            "an --output without checkpoints/")
  loaded = loading.load(src, shift=shift, config_path=config_path)
  if loaded.kind == "orbax":
    raise InputError(f"{src} is already an orbax run of this project; use it as it is")
  model, cfg = loaded.model, loaded.config
  run_config: dict[str, Any] = {"model": cfg.to_dict()}
  n_classes = getattr(model, "n_classes", 0)
  if n_classes:
    run_config["head"] = {"n_classes": int(n_classes), "pooling": pooling}
  out = checkpoint.save_model(os.fspath(workdir), model, run_config, step=step)
  if not storage.resolve(out).exists():
    raise OutputExistsError(f"orbax did not write {out}; choose an empty --output")
  return out, run_config


if __name__ == "__main__":
  from absl import app, flags, logging

  from hyena_jax import cli

  flags.DEFINE_string("model", None, "Official weights file, or a directory holding one and "
                      "config.json (see hyena_jax.load).")
  flags.DEFINE_string("output", None, "Run directory to create checkpoints/<save_step>/ in.")
  flags.DEFINE_float("shift", None, "Filter-modulation shift; default: the config's, else 0.05.")
  flags.DEFINE_enum("pooling", "mean", list(typing.get_args(Pooling)),
                    "Pooling of a classification head (official configs do not record it).")
  flags.DEFINE_string("config_json", None, "Official config.json to use instead of the one "
                      "beside the weights.")
  flags.DEFINE_integer("save_step", 0, "Step number of the written checkpoint.")
  cli.define_deprecated_alias("from", "model")
  cli.define_deprecated_alias("out", "output")
  cli.define_deprecated_alias("config", "config_json")
  cli.define_deprecated_alias("step", "save_step", flags.DEFINE_integer)
  FLAGS = flags.FLAGS

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out, run_config = convert(cli.aliased("model", "from"), cli.aliased("output", "out"),
                              shift=FLAGS.shift, pooling=FLAGS.pooling,
                              config_path=cli.aliased("config_json", "config", required=False),
                              step=cli.aliased("save_step", "step"))
    logging.info("run config: %s", run_config)
    print(out)

  cli.run(main)
