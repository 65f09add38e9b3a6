"""Entry point: python -m hyena_jax.main --config=configs/default.py --workdir=DIR."""

import os

# Faster CPU backward passes (SPEC section 12); must be set before jax initialises its backend.
if "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_experimental_ynn_fusion_type=-reduce").strip()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from hyena_jax import cli, train  # noqa: E402

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "default.py")
cli.define_config_file(
    "config", _DEFAULT_CONFIG, "Training config file; override fields with --config.a.b=value.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints and metrics go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU pods / clusters).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(), jax.process_count(),
               jax.devices())
  train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
