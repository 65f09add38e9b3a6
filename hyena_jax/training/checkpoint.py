"""Orbax checkpoints of a run: one step directory holds every item needed to resume.

    WORKDIR/checkpoints/<step>/
        params     model parameters (nested dict of arrays, NNX parameter paths)
        opt_state  optax state                 (training runs only)
        data       Grain iterator state        (training runs only)
        config     the run's ml_collections config as JSON (model fields under "model")
        progress   step, data stage, checksums of params and opt_state (training runs only)
        metrics    (orbax) validation metrics used to keep the best checkpoint

Orbax writes each step to a temporary directory and renames it when complete, so an interrupted
save never replaces a good checkpoint; a directory without orbax's commit marker is ignored.
Orbax does not checksum array data (tensorstore's zarr3 codec checksums only the shard index),
so a flipped byte in a params file restores silently; training therefore stores a checksum of
every array in `progress` and verifies it on resume (`fingerprints`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from hyena_jax import storage
from hyena_jax.errors import InputError, MissingInputError, OutputExistsError, is_storage_failure
from hyena_jax.model import config as config_lib
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM, SequenceClassifier

CHECKPOINT_SUBDIR = "checkpoints"
_policies = ocp.checkpoint_managers.preservation_policy


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """`<workdir>/checkpoints`, absolute when local (orbax refuses relative paths, at the first
  save after minutes of training) and unchanged when a URL (gs://): every orbax path in the
  project is built here."""
  return storage.resolve(workdir) / CHECKPOINT_SUBDIR


class CheckpointSaveError(InputError):
  """A checkpoint could not be written (disk full, permissions): the run stops at once."""


def save_failure(error: BaseException, workdir: str) -> CheckpointSaveError | None:
  """The one-line error for a failed checkpoint save, when an OSError caused it (else None: a
  bug, left to its traceback). Names the folder, the free space and the newest complete step."""
  cause, seen = error, set()
  while cause is not None and not is_storage_failure(cause) and id(cause) not in seen:
    seen.add(id(cause))
    cause = cause.__cause__ or cause.__context__
  if cause is None or not is_storage_failure(cause):
    return None
  folder = checkpoint_dir(workdir)
  try:
    newest = latest_step(workdir)
  except Exception:  # pylint: disable=broad-except  (the disk is in trouble; say what we can)
    newest = None
  kept = (f"the newest complete checkpoint is step {newest}, and the same command resumes from "
          "it" if newest is not None else "no checkpoint is complete yet")
  free = ""
  if not storage.is_url(folder):
    try:
      free = f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free there)"
    except OSError:
      pass
  if getattr(cause, "errno", None) == errno.ENOSPC or any(
      mark in str(cause) for mark in ("No space left", "RESOURCE_EXHAUSTED")):
    return CheckpointSaveError(
        f"saving a checkpoint to {storage.display(folder)} failed: no space left on the device"
        f"{free}; {kept}. Free space (or lower checkpoint.keep_last), then run it again")
  return CheckpointSaveError(
      f"saving a checkpoint to {storage.display(folder)} failed: "
      f"{getattr(cause, 'strerror', None) or cause}{free};"
      f" {kept}. Fix the folder (permissions, mount), then run it again")


class DamagedCheckpointError(InputError):
  """A checkpoint step whose files are missing, unreadable or fail their checksum."""


def make_manager(workdir: str, *, keep_last: int = 3, keep_best: bool = True,
                 async_save: bool = True, best_metric: str = "valid_loss",
                 create: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep_last` steps plus the best by `best_metric`."""
  policies = [_policies.LatestN(n=keep_last)]
  if keep_best:
    policies.append(_policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True, n=1,
                                    keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=_policies.AnyPreservationPolicy(policies),
      enable_async_checkpointing=async_save, create=create, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def config_to_json(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
  cfg = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return json.loads(json.dumps(cfg, default=list))  # tuples -> lists, JSON-clean


def model_config(run_config: Mapping[str, Any] | ml_collections.ConfigDict) -> HyenaConfig:
  """The HyenaConfig stored in a run config's `model` section."""
  model = run_config["model"]
  model = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
  return config_lib.from_dict(model)


def head_of(run_config: Mapping[str, Any] | ml_collections.ConfigDict) -> tuple[int, str]:
  """(n_classes, pooling) of a classification run; (0, "") for a language model."""
  head = run_config.get("head") if hasattr(run_config, "get") else None
  if not head or not head["n_classes"]:
    return 0, ""
  return int(head["n_classes"]), str(head["pooling"])


def build_model(cfg: HyenaConfig, n_classes: int = 0, pooling: str = "mean",
                rngs: nnx.Rngs | None = None) -> HyenaLM | SequenceClassifier:
  rngs = rngs or nnx.Rngs(0)
  if n_classes:
    return SequenceClassifier(cfg, n_classes, pooling=pooling, rngs=rngs)
  return HyenaLM(cfg, rngs=rngs)


def abstract_params(model: nnx.Module, shardings: Any = None) -> dict:
  """ShapeDtypeStruct tree of the model's parameters (optionally with shardings)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      params, shardings)


def latest_step(workdir: str) -> int | None:
  path = checkpoint_dir(workdir)
  if not path.is_dir():
    return None
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    return mngr.latest_step()


def read_run_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """Returns (run config dict, step) of a checkpoint; errors say what exists instead."""
  path = checkpoint_dir(workdir)
  if not path.is_dir():
    raise MissingInputError(f"no checkpoints in {workdir}: expected {path}/<step>/ written by "
                            "hyena_jax.main or hyena_jax.convert")
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise MissingInputError(f"{path} holds no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
      raise MissingInputError(f"no checkpoint for step {step} in {path}; available: {sorted(steps)}")
  return read_json_item(workdir, step, "config"), step


def read_json_item(workdir: str, step: int, item: str) -> dict:
  """A JSON item of a step (config, progress), read directly: a missing or torn file is named
  instead of surfacing as an orbax traceback."""
  path = step_dir(workdir, step) / item / "metadata"
  try:
    return dict(json.loads(path.read_text()))
  except (OSError, ValueError, TypeError) as e:
    reason = "is missing" if isinstance(e, FileNotFoundError) else f"is unreadable ({e})"
    raise DamagedCheckpointError(f"checkpoint step {step} is damaged: {path} {reason}") from e


def step_dir(workdir: str, step: int) -> epath.Path:
  return checkpoint_dir(workdir) / str(step)


def missing_files(workdir: str, step: int, items: tuple[str, ...]) -> list[str]:
  """Files of `items` that a complete training step directory has and this one lacks.

  The data iterator states of every process are checked, not only this one's: all processes
  of a multi-host run (one shared workdir) must reach the same verdict on a step, else they
  would restore different steps and wait for each other forever.
  """
  count = jax.process_count()
  expected = {"config": ("metadata",), "progress": ("metadata",),
              "params": ("_METADATA", "manifest.ocdbt"), "opt_state": ("_METADATA", "manifest.ocdbt"),
              "data": tuple(f"process_{i}-of-{count}.json" for i in range(count))}
  root = step_dir(workdir, step)
  return [os.fspath(root / item / name) for item in items for name in expected[item]
          if not (root / item / name).exists()]


def move_aside(workdir: str, step: int) -> str:
  """Moves a damaged step out of the checkpoints folder (orbax then no longer sees it) into
  WORKDIR/damaged_checkpoints/, keeping it for inspection; returns where it went."""
  dest_root = storage.resolve(workdir) / "damaged_checkpoints"
  dest, n = dest_root / str(step), 1
  while dest.exists():
    dest, n = dest_root / f"{step}.{n}", n + 1
  storage.move(step_dir(workdir, step), dest)
  return os.fspath(dest)


# ------------------------------------------------------------------------------------------------
# Checksums of arrays (orbax has none for array data)

_KNUTH = 2654435761  # odd: multiplying by it is a bijection mod 2**32


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """[2] uint32: the sum of the array's bit patterns and a position-weighted sum, mod 2**32.

  Any single changed word changes both (the weights are odd, so multiplying by one is invertible
  mod 2**32); the weighted sum also catches words swapped between positions. Integer sums are
  exact, so the result does not depend on sharding or reduction order.
  """
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize in unsigned:
    bits = jax.lax.bitcast_convert_type(x, unsigned[x.dtype.itemsize]).astype(jnp.uint32)
  else:
    raise TypeError(f"no checksum for dtype {x.dtype}")
  bits = bits.reshape(-1)
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2 * _KNUTH % 2**32) + jnp.uint32(1)
  return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)])


_fingerprint_tree = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprints(tree: Any) -> dict[str, list[int]]:
  """{path: [sum, weighted sum]} of every array of a pytree, computed where the arrays live
  (one small jitted reduction; nothing is copied to the host but two words per array)."""
  sums = jax.device_get(_fingerprint_tree(tree))
  return {jax.tree_util.keystr(path): [int(v) for v in value]
          for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def verify_fingerprints(tree: Any, expected: Mapping[str, list[int]], what: str) -> None:
  """Raises DamagedCheckpointError naming the first array whose checksum differs."""
  got = fingerprints(tree)
  for path in sorted(set(got) | set(expected)):
    if got.get(path) != expected.get(path):
      raise DamagedCheckpointError(
          f"{what}{path} does not match the checksum saved with it (flipped bytes on disk)")


def verify_saved_params(workdir: str, step: int, params: Any) -> None:
  """Checks restored parameters against the checksums saved with them (pretraining checkpoints
  carry them; converted and fine-tuned ones have none); raises DamagedCheckpointError."""
  if (step_dir(workdir, step) / "progress" / "metadata").exists():
    expected = read_json_item(workdir, step, "progress").get("fingerprints", {}).get("params")
    if expected is not None:
      verify_fingerprints(params, expected,
                          f"checkpoint step {step} is damaged: {step_dir(workdir, step)}/params")


def restore_model(workdir: str, step: int | None = None, *, shardings: Any = None
                  ) -> tuple[HyenaLM | SequenceClassifier, dict, int]:
  """Restores only the parameters of a checkpoint into a freshly built model, in eval mode.

  The model is first built abstractly (`nnx.eval_shape`), so nothing is allocated beyond the
  restored arrays, which land with `shardings` when given (else on the default device).
  Returns (model, run config dict, step).
  """
  run_config, step = read_run_config(workdir, step)
  cfg = model_config(run_config)
  n_classes, pooling = head_of(run_config)
  abstract_model = nnx.eval_shape(lambda: build_model(cfg, n_classes, pooling))
  if shardings is None:
    # Explicitly, not orbax's default (the saved sharding): that names the devices of the
    # training run and fails for a checkpoint of a multi-process run (devices of other hosts).
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: one_device, abstract_params(abstract_model))
  target = abstract_params(abstract_model, shardings)
  with ocp.CheckpointManager(checkpoint_dir(workdir),
                             options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  verify_saved_params(workdir, step, restored["params"])
  # The model holds only Params (dropout takes its key per call), so the restored parameters
  # are the whole state.
  graphdef, params_state = nnx.split(abstract_model, nnx.Param)
  nnx.replace_by_pure_dict(params_state, restored["params"])
  model = nnx.merge(graphdef, params_state)
  model.eval()  # inference mode (no dropout); call model.train() to fine-tune
  return model, run_config, step


def save_model(workdir: str, model: nnx.Module, run_config: Mapping[str, Any] |
               ml_collections.ConfigDict, step: int = 0) -> str:
  """Writes a parameters-only checkpoint (e.g. a converted PyTorch release) training can start from."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  with make_manager(workdir, keep_best=False, async_save=False) as mngr:
    if step in mngr.all_steps():
      raise OutputExistsError(f"{checkpoint_dir(workdir)} already has step {step}; choose another "
                              "workdir or step (existing checkpoints are never overwritten)")
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                            config=ocp.args.JsonSave(config_to_json(run_config))))
    mngr.wait_until_finished()
  return os.fspath(step_dir(workdir, step))
