"""Tiny CPU default: the tiny-1k architecture learning the bundled E. coli genome in minutes.

Run (laptop CPU, 2+ cores):
  python -m hyena_jax.main --workdir=runs/default
What to expect: ~300 steps in a few minutes on 2 cores with a sequence-length warm-up
256 -> 512 -> 1024; train loss falls from ln(16) = 2.77 to about 1.3 nats/base (below
ln(4) = 1.386, i.e. better than guessing bases uniformly); validation perplexity about 3.7-3.9
on the held-out last 5% of the chromosome. Writes checkpoints, metrics.jsonl, TensorBoard events
and curves.png to the workdir.
"""

from hyena_jax import run_config


def get_config():
  config = run_config.release_config("tiny-1k")
  # Bundled genome (data.fasta = ""), tiled into windows; last 5% of the chromosome = valid.
  config.data.num_workers = 0
  config.train.global_batch_size = 16
  config.train.stages = ((100, 256, 1), (100, 512, 1), (100, 1024, 2))
  config.train.log_every_steps = 25
  config.optim.learning_rate = 1e-3
  config.eval.every_steps = 100
  config.eval.num_batches = 4
  config.eval.batch_size = 16
  config.checkpoint.every_steps = 100
  return config
