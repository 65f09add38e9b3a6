"""Exports any model `hyena_jax.load` reads to the official PyTorch HyenaDNA formats
(`weights.LAYOUTS`; `python -m hyena_jax.export` runs it from the command line).

The source is an orbax run of this project (with `step`), an official weights file or folder,
or a Hub repo id: the same `--model` every tool takes. So an -hf release can be re-exported as a
Lightning checkpoint, and a fine-tuned run as a standalone state dict with its head.

What a layout cannot express (the -hf code hard-codes shift 0.05 and epsilon 1e-5, has no
classification head of ours) is refused before anything is written. The original-style configs
carry the model's `shift` as `layer.shift` (no official config records it; `standalone_hyenadna`
passes it through, and our importer reads it). Tensors are converted one at a time;
`pos_emb.z`/`t` and `modulation.deltas`, which dominate the file at 1M context
(n_layer * l_max * 6 floats), are built once and written for every layer. Output is written
under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from flax import nnx

from hyena_jax import storage
from hyena_jax.errors import InputError, OutputExistsError
from hyena_jax.interop import formats, loading, weights
from hyena_jax.interop.formats import (DEFAULT_REMOTE_CODE, HF_LAYER_NORM_EPSILON, HF_SHIFT,
                                       WEIGHT_FILE_OF_LAYOUT)
from hyena_jax.interop.weights import LAYOUTS
from hyena_jax.model.config import HyenaConfig


def check_exportable(cfg: HyenaConfig, layout: str, n_classes: int = 0, pooling: str = "mean"
                     ) -> None:
  """Raises InputError naming every model feature that `layout` cannot express."""
  if layout not in LAYOUTS:
    raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  problems = []
  if layout == "hf":
    if cfg.shift != HF_SHIFT:
      problems.append(
          f"shift={cfg.shift}: the -hf remote code hard-codes shift {HF_SHIFT} in the filter "
          "modulation, so this model would compute different outputs there; export it with "
          "--layout=lightning or --layout=standalone (which record the shift in config.json), or "
          f"train with model.shift={HF_SHIFT}")
    if cfg.layer_norm_epsilon != HF_LAYER_NORM_EPSILON:
      problems.append(
          f"layer_norm_epsilon={cfg.layer_norm_epsilon}: the -hf remote code hard-codes "
          f"{HF_LAYER_NORM_EPSILON} in norm1/norm2, so this model would compute different "
          "outputs there; export it with --layout=lightning or --layout=standalone (which record "
          f"the epsilon in config.json), or train with model.layer_norm_epsilon="
          f"{HF_LAYER_NORM_EPSILON}")
    if not cfg.modulate:
      problems.append("modulate=False: the -hf config has no such switch (always modulated); use "
                      "--layout=lightning or --layout=standalone")
    if n_classes:
      problems.append(
          "a classification head: the -hf HyenaDNAForSequenceClassification head (`score`, no "
          "bias, different pooling) cannot hold it; use --layout=standalone or --layout=lightning, "
          "or --nohead to export only the backbone as a language model")
  if n_classes and pooling != "mean":
    problems.append(f"pooling={pooling!r}: the official head pools by mean in the standalone "
                    "model and official configs do not record a pooling mode")
  if problems:
    raise InputError(f"cannot export this model to the {layout!r} layout:\n  - " +
                     "\n  - ".join(problems))


# Every file an export may write; --overwrite replaces only these, whatever else the folder holds.
EXPORT_FILES = tuple(WEIGHT_FILE_OF_LAYOUT.values()) + ("config.json",)


def _publish(tmp_dir: str, out_dir: str, overwrite: bool) -> None:
  """Moves the finished temporary directory to `out_dir`.

  With `overwrite` and an existing `out_dir`, each file this exporter writes is renamed into it
  (replacing the old one), and the other layouts' weight files are removed (they would no longer
  match config.json); files the exporter never writes are left untouched.
  """
  if storage.is_url(out_dir):
    _upload(tmp_dir, storage.resolve(out_dir), overwrite)
    return
  if not os.path.exists(out_dir):
    os.replace(tmp_dir, out_dir)
    return
  if not overwrite:
    raise OutputExistsError(f"{out_dir} exists; choose another --output or pass --overwrite")
  written = os.listdir(tmp_dir)
  for name in written:
    os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
  for name in EXPORT_FILES:
    stale = os.path.join(out_dir, name)
    if name not in written and os.path.isfile(stale):
      os.remove(stale)
  os.rmdir(tmp_dir)


def _upload(tmp_dir: str, out_dir, overwrite: bool) -> None:
  """`_publish` for an object store (no rename): each file is one upload, which appears whole,
  and config.json goes last, so a reader that finds it finds the weights it describes."""
  if out_dir.exists() and not overwrite:
    raise OutputExistsError(f"{out_dir} exists; choose another --output or pass --overwrite")
  written = sorted(os.listdir(tmp_dir), key=lambda name: name == "config.json")
  for name in written:
    with open(os.path.join(tmp_dir, name), "rb") as f:
      (out_dir / name).write_bytes(f.read())
  for name in EXPORT_FILES:
    if name not in written and (out_dir / name).exists():
      (out_dir / name).unlink()
  shutil.rmtree(tmp_dir)



def export(source: str | os.PathLike, out_dir: str, step: int | None = None, layout: str = "hf",
           *, include_head: bool = True, checkpoint_mixer: bool = False,
           remote_code_repo: str = DEFAULT_REMOTE_CODE, overwrite: bool = False,
           revision: str | None = None, shift: float | None = None) -> str:
  """Exports the model at `source` (`hyena_jax.load`'s sources; `step` of an orbax run, default
  the latest; `revision` of a Hub id; `shift` of official weights) to `out_dir`; returns out_dir.

  Refuses what `layout` cannot express before anything is written; the folder appears only once
  complete.
  """
  if layout not in LAYOUTS:
    raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  storage.check_access(out_dir, "--output")
  out_path = storage.resolve(out_dir)
  out_dir = os.fspath(out_path)
  if out_path.exists() and not overwrite:
    raise OutputExistsError(f"{out_dir} exists; choose another --output or pass --overwrite")
  if out_path.exists() and not out_path.is_dir():
    raise OutputExistsError(f"{out_dir} is a file, not a folder; choose another --output")
  storage.check_writable(out_dir, "--output")  # the export is built beside it, then renamed
  loaded = loading.load(source, step=step, revision=revision, shift=shift)
  cfg, n_classes, pooling = loaded.config, loaded.n_classes, loaded.pooling or "mean"
  if not include_head:
    n_classes, pooling = 0, ""
  check_exportable(cfg, layout, n_classes, pooling)
  params = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
  tensors = weights.state_dict_from_params(params, cfg, layout=layout, n_classes=n_classes,
                                           checkpoint_mixer=checkpoint_mixer)
  # Built beside the output (one rename publishes it), or in local temp space for a bucket.
  parent = tempfile.gettempdir() if storage.is_url(out_dir) else os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp's 0700 would make the published dir private
  try:
    weights_path = os.path.join(tmp_dir, WEIGHT_FILE_OF_LAYOUT[layout])
    if layout == "hf":
      formats.write_safetensors(weights_path, tensors, {"format": "pt"})
      config_json = formats.hf_config(cfg, remote_code_repo)
    else:
      formats.write_torch(weights_path, tensors, wrap_lightning=layout == "lightning",
                          global_step=loaded.step or 0)
      config_json = formats.original_config(cfg, n_classes=n_classes,
                                            checkpoint_mixer=checkpoint_mixer)
    with open(os.path.join(tmp_dir, "config.json"), "w") as f:
      json.dump(config_json, f, indent=2)
      f.write("\n")
    _publish(tmp_dir, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return out_dir
