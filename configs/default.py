"""Tiny CPU default: the tiny-1k architecture learning the bundled E. coli genome in minutes.

Run (laptop CPU, 2+ cores):
  python -m hyena_jax.main --workdir=runs/default
What to expect: 300 steps (about 3.5M tokens) with a sequence-length warm-up 256 -> 512 -> 1024,
2-3 min on 2 CPU cores (123-190 s; 85-139 s when the compilation cache is warm; see README "Set
up"). The train loss falls from ln(16) = 2.77 to about 1.35 nats/base,
below ln(4) = 1.386 (better than guessing bases uniformly); validation loss about 1.35
(perplexity about 3.87) on the held-out last 5% of the chromosome. The validation after the
first stage is worse (about 1.6): it runs at the final length 1024, 4x longer than anything the
model has seen yet. Writes checkpoints, metrics.jsonl, TensorBoard events and curves.png.
"""

from hyena_jax.training import run_config


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
