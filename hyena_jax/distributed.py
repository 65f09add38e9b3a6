"""Joining a multi-process JAX run (`--distributed`): one code path for clusters and laptops.

`initialize()` calls `jax.distributed.initialize`. Where the environment names the cluster
explicitly,

    HYENA_JAX_COORDINATOR     host:port of process 0's coordination service
    HYENA_JAX_NUM_PROCESSES   number of processes in the run
    HYENA_JAX_PROCESS_ID      this process's index, 0 .. NUM_PROCESSES - 1

(set by launch/local_cluster.py, or by any launcher that knows no better), those are passed on;
otherwise JAX detects the cluster itself (Cloud TPU VMs, SLURM, Open MPI). On CPU, processes
exchange collectives over TCP with gloo (jax's default `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os

from hyena_jax.errors import InputError

COORDINATOR = "HYENA_JAX_COORDINATOR"
NUM_PROCESSES = "HYENA_JAX_NUM_PROCESSES"
PROCESS_ID = "HYENA_JAX_PROCESS_ID"
_VARS = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)


def cluster_from_env(environ: dict | None = None) -> dict | None:
  """{coordinator_address, num_processes, process_id} from HYENA_JAX_*, or None when unset."""
  environ = os.environ if environ is None else environ
  present = [v for v in _VARS if environ.get(v)]
  if not present:
    return None
  if len(present) != len(_VARS):
    raise InputError(f"{', '.join(present)} set but {', '.join(sorted(set(_VARS) - set(present)))}"
                     f" not: set all three of {', '.join(_VARS)}, or none to let JAX detect the "
                     "cluster (TPU VM, SLURM, Open MPI)")
  try:
    count, index = int(environ[NUM_PROCESSES]), int(environ[PROCESS_ID])
  except ValueError:
    raise InputError(f"{NUM_PROCESSES}={environ[NUM_PROCESSES]!r} and {PROCESS_ID}="
                     f"{environ[PROCESS_ID]!r} must be integers") from None
  if count < 1 or not 0 <= index < count:
    raise InputError(f"{PROCESS_ID}={index} must lie in [0, {NUM_PROCESSES}={count})")
  if ":" not in environ[COORDINATOR]:
    raise InputError(f"{COORDINATOR}={environ[COORDINATOR]!r} must be host:port")
  return {"coordinator_address": environ[COORDINATOR], "num_processes": count,
          "process_id": index}


def initialize() -> None:
  """jax.distributed.initialize with the HYENA_JAX_* cluster, else JAX's auto-detection."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(**(cluster_from_env() or {}))
