"""Entry point: python -m hyena_jax.main --config=configs/default.py --workdir=DIR.

Running the same command again resumes an interrupted run, and reports a finished one without
changing it. Exit status: 0 when the run has finished; 128 + the signal's number when SIGTERM
(143, preemption) or Ctrl-C/SIGINT (130) stopped it after saving a checkpoint, as a shell
reports a process the signal ended, so a scheduler can tell preemption from success. A second
Ctrl-C stops at once without saving (also 130).
"""

import os
import signal
import sys

import jax
from absl import app, flags, logging

from hyena_jax import cli
from hyena_jax.training import distributed
from hyena_jax.training import pretrain as train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "default.py")
cli.define_config_file(
    "config", _DEFAULT_CONFIG, "Training config file (default: configs/default.py)")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints and metrics go.")
_ALLOW_CHANGED = flags.DEFINE_list(
    "allow_changed", [],
    "Optimizer fields (optim.learning_rate, ...) that may differ from the checkpoint's when "
    "resuming, e.g. to continue after a NaN stop with a lower --config.optim.learning_rate. "
    "The change is recorded in the checkpoint's progress.")
_SKIP_DAMAGED = flags.DEFINE_bool(
    "skip_damaged_checkpoints", False,
    "Resume from the newest checkpoint that restores and passes its checksums; damaged newer "
    "steps are moved to WORKDIR/damaged_checkpoints/.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Join a multi-process run with jax.distributed.initialize(): the cluster comes from "
    "HYENA_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID when set (launch/local_cluster.py), else "
    "JAX detects it (TPU VMs, SLURM, Open MPI).")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100,
    "--distributed: seconds without a heartbeat after which the coordination service declares a "
    "process dead and the others exit (non-zero), instead of waiting in a collective.")
flags.adopt_module_key_flags(cli)  # --config and --print_config in --help


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    distributed.initialize(heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  if jax.process_index() != 0:
    # Progress and metrics come from process 0; the others would print every line again.
    logging.set_verbosity(logging.WARNING)
  try:
    result = train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value,
                                      allow_changed=_ALLOW_CHANGED.value,
                                      skip_damaged_checkpoints=_SKIP_DAMAGED.value)
  except Exception as e:  # pylint: disable=broad-except
    if not distributed.lost_a_peer(e):
      raise
    # The usual end of a run that lost a worker: one line, not a traceback per process.
    first = str(e).strip().splitlines()[0][:200]
    sys.stderr.write(
        f"error: process {jax.process_index()}: another process of this run stopped ({first}); "
        "run the same command on every host again to resume from the last checkpoint\n")
    sys.stderr.flush()
    sys.exit(1)
  except KeyboardInterrupt:
    # A second Ctrl-C. Leaving through the interpreter's teardown segfaults when the interrupt
    # arrived during an XLA compilation (jax 0.10.2), so exit at once; an unfinished save is
    # a temporary folder orbax ignores and removes at the next start.
    logging.warning("stopped at once by a second Ctrl-C, without saving; the last checkpoint "
                    "resumes the run")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signal.SIGINT)
  if result["status"] != "finished":
    sys.exit(128 + signal.Signals[result.get("signal", "SIGTERM")].value)


if __name__ == "__main__":
  cli.run(main)
