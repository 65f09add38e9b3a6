"""Orbax checkpoints of a run: one step directory holds every item needed to resume.

    WORKDIR/checkpoints/<step>/
        params     model parameters (nested dict of arrays, NNX parameter paths)
        opt_state  optax state                 (training runs only)
        data       Grain iterator state        (training runs only)
        config     the run's ml_collections config as JSON (model fields under "model")
        metrics    (orbax) validation metrics used to keep the best checkpoint

Orbax writes each step to a temporary directory and renames it when complete, so an interrupted
save never replaces a good checkpoint; a directory without orbax's commit marker is ignored.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from hyena_jax import config as config_lib
from hyena_jax.config import HyenaConfig
from hyena_jax.errors import MissingInputError, OutputExistsError
from hyena_jax.model import HyenaLM, SequenceClassifier

CHECKPOINT_SUBDIR = "checkpoints"
_policies = ocp.checkpoint_managers.preservation_policy


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  """Absolute `<workdir>/checkpoints`: orbax refuses relative paths (at the first save, after
  minutes of training), so every orbax path in the project is built here."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_SUBDIR)


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
  if not os.path.isdir(path):
    return None
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    return mngr.latest_step()


def read_run_config(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """Returns (run config dict, step) of a checkpoint; errors say what exists instead."""
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise MissingInputError(f"no checkpoints in {workdir}: expected {path}/<step>/ written by "
                            "hyena_jax.main or hyena_jax.convert")
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise MissingInputError(f"{path} holds no complete checkpoint")
    step = max(steps) if step is None else step
    if step not in steps:
      raise MissingInputError(f"no checkpoint for step {step} in {path}; available: {sorted(steps)}")
    restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return dict(restored["config"]), step


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
  target = abstract_params(abstract_model, shardings)
  with ocp.CheckpointManager(checkpoint_dir(workdir),
                             options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
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
  return os.path.join(checkpoint_dir(workdir), str(step))
