"""Ahead-of-time lowering and compilation of the train step (no parameters are allocated)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from hyena_jax import sharding, train


def lower_train_step(config: ml_collections.ConfigDict, *, stage: int = -1,
                     devices: list | None = None):
  """Lowers stage `stage`'s train step on abstract, sharded inputs; returns jax's Lowered."""
  run = train.build_run(config, devices=devices)
  _, seq_len, accum = config.train.stages[stage]
  batch_sharding = sharding.batch_sharding(run.mesh)
  batch = {k: jax.ShapeDtypeStruct((config.train.global_batch_size, seq_len), dtype,
                                   sharding=batch_sharding)
           for k, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                            ("loss_mask", jnp.float32))}
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       run.abstract_state, run.state_shardings)
  step = jax.jit(train.make_train_step(run.graphdef, run.tx, run.schedule, grad_accum=accum,
                                       seed=config.train.seed, forward=run.forward),
                 in_shardings=(run.state_shardings, batch_sharding),
                 out_shardings=(run.state_shardings, None), donate_argnums=0)
  return step.lower(state, batch)


def compile_train_step(config: ml_collections.ConfigDict, *, stage: int = -1,
                       devices: list | None = None, lower_only: bool = False) -> dict[str, Any]:
  """Compiles the step and reports `memory_analysis()` per device, in GiB."""
  lowered = lower_train_step(config, stage=stage, devices=devices)
  _, seq_len, accum = config.train.stages[stage]
  report: dict[str, Any] = {
      "devices": len(devices) if devices is not None else jax.device_count(),
      "seq_len": seq_len, "global_batch_size": config.train.global_batch_size,
      "grad_accum": accum, "dtype": config.model.dtype, "remat": config.model.remat}
  if lower_only:
    return report
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  gib = 2.0 ** 30
  if memory is not None:
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "alias_size_in_bytes"):
      report[name.replace("_in_bytes", "_gib")] = round(getattr(memory, name, 0) / gib, 3)
    report["peak_estimate_gib"] = round(
        (memory.argument_size_in_bytes + memory.output_size_in_bytes
         + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / gib, 3)
  return report
