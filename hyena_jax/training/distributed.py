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
import signal

import numpy as np
from absl import logging

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


def initialize(heartbeat_timeout_s: int = 100) -> None:
  """jax.distributed.initialize with the HYENA_JAX_* cluster, else JAX's auto-detection.

  `heartbeat_timeout_s`: how long the coordination service waits for a silent process before it
  declares the run failed and every other process exits (non-zero). Without it, the survivors
  of a dead process would wait in their next collective until something killed them.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(**(cluster_from_env() or {}),
                             heartbeat_timeout_seconds=heartbeat_timeout_s)


# What a collective or the coordination service says when another process of the run is gone:
# gloo (CPU) at once, the coordination service after the heartbeat timeout (accelerators).
_PEER_LOSS = ("Connection closed by peer", "Connection reset by peer", "Gloo", "heartbeat",
              "has been set to ERROR", "UNAVAILABLE")


def lost_a_peer(error: BaseException) -> bool:
  """Whether `error`, raised in a multi-process run, says that another process stopped."""
  import jax  # pylint: disable=g-import-not-at-top
  return (jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)
          and any(marker in str(error) for marker in _PEER_LOSS))


class Preemption:
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks between steps:
  it saves a checkpoint and stops, and the run reports "interrupted". A second Ctrl-C stops at
  once, without saving. SIGINT is left alone where it is ignored (nohup, background jobs) or
  handled by the embedding program."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
        continue
      try:
        self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not in the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handler(self, signum, frame):
    if signum == signal.SIGINT and self.signum is not None:
      raise KeyboardInterrupt
    self.signum = self.signum or signum
    logging.warning("%s received: saving a checkpoint after this step, then exiting%s",
                    signal.Signals(signum).name,
                    " (Ctrl-C again stops at once, without saving)"
                    if signum == signal.SIGINT else "")

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def agreed(self) -> bool:
    """Whether any process has been asked to stop: the same answer on every process.

    A signal reaches the processes of a multi-host run at slightly different moments, and a
    checkpoint needs all of them at the same step; so after every step each process contributes
    its flag to one all-gather and all stop after the step at which the first one was asked.
    (One host round trip per step; a single process only reads its flag.)
    """
    import jax  # pylint: disable=g-import-not-at-top  (the launcher imports this module)
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
    if self.signum is None and flags.any():  # stop with the signal another process received
      self.signum = int(flags[flags > 0][0])
    return bool(flags.any())


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (the same answer everywhere)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def sync_processes(name: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------------
# The loop
