"""Converts an official PyTorch HyenaDNA release into an orbax run of this project
(`python -m hyena_jax.convert` runs it from the command line).

The source is a Hub repo id, a weights file or a directory holding one (see `hyena_jax.load`), with
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

from hyena_jax import storage
from hyena_jax.errors import InputError, OutputExistsError
from hyena_jax.interop import loading
from hyena_jax.model.hyenadna import Pooling
from hyena_jax.training import checkpoint


def convert(src: str | os.PathLike, workdir: str | os.PathLike, *, shift: float | None = None,
            pooling: str = "mean", config_path: str | os.PathLike | None = None,
            step: int = 0, revision: str | None = None) -> tuple[str, dict[str, Any]]:
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
  loaded = loading.load(src, shift=shift, config_path=config_path, revision=revision)
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
