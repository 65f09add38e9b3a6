"""HyenaDNA pretraining on hg38 at every released size (SPEC sections 4-5), as one table.

Run (after launch/prepare_hg38.sh has written data/hg38/), on every host of the run:
  python -m hyena_jax.main --config=configs/hg38.py:medium-160k --workdir=DIR
  python -m hyena_jax.main --config=configs/1m.py --workdir=gs://BUCKET/run   # = hg38.py:large-1m
Check memory first without hardware: python -m hyena_jax.aot --config=configs/hg38.py:NAME
--target=h100 (or a TPU slice).

Each row is the paper's recipe for one released model (`hyena_jax.released(NAME)`): a warm-up
from 64 bases doubling per stage to `seq_len`, the global batch held fixed by gradient
accumulation (micro-batches of at most `max_tokens` tokens), AdamW 6e-4 with cosine decay.
Lower or raise the accumulation with --config.train.stages to fit memory; the global batch stays.
Expected validation perplexity on hg38: ~2.9 (tiny-16k), ~2.7-2.8 (large-1m after ~20k steps).

large-1m keeps the release's l_max of 1,000,002: the filter's positional grid depends on it, so
another value would no longer match the released weights. A stage of 2^20 = 1,048,576 tokens
(the power-of-two lengths of the memory tables) needs --config.model.l_max=1048578, for a run
that does not start from the released checkpoint; python -m hyena_jax.aot --seq_len raises it.
"""

import dataclasses

from hyena_jax.training import run_config


@dataclasses.dataclass(frozen=True)
class Recipe:
  seq_len: int            # the last stage's length (the released context)
  global_batch: int       # sequences per optimizer step, in every stage
  final_steps: int        # steps at seq_len; each warm-up stage adds `warmup_steps`
  warmup_steps: int
  max_tokens: int         # per micro-batch (all devices): sets each stage's grad_accum
  remat: str = "none"     # bf16 compute everywhere; remat + scan_layers for the long contexts
  scan_layers: bool = False
  num_workers: int = 4    # grain reader processes per host


MODEL = {
    "tiny-1k": Recipe(1_024, 256, 10_000, 1_000, 262_144),
    "tiny-1k-d256": Recipe(1_024, 256, 10_000, 1_000, 262_144),
    "tiny-16k-d128": Recipe(16_384, 64, 10_000, 1_000, 262_144),
    "small-32k": Recipe(32_768, 256, 10_000, 1_000, 262_144),
    "medium-160k": Recipe(160_000, 64, 20_000, 1_000, 524_288, "block", True),
    "medium-450k": Recipe(450_000, 64, 20_000, 1_000, 1_048_576, "block", True),
    # One 1M-token sequence per device on 8 x 80 GB GPUs, or a TPU v5p-16.
    "large-1m": Recipe(1_000_000, 8, 20_000, 500, 8_000_000, "block", True, 8),
}


def get_config(name: str = "tiny-1k"):
  if name not in MODEL:
    raise ValueError(f"configs/hg38.py:{name}: no such released size; choose one of "
                     f"{', '.join(MODEL)}")
  recipe = MODEL[name]
  config = run_config.release_config(name)
  config.data.fasta = "data/hg38/hg38.ml.fa"
  config.data.bed = "data/hg38/human-sequences.bed"
  config.data.num_workers = recipe.num_workers
  config.train.global_batch_size = recipe.global_batch
  config.train.stages = run_config.warmup_stages(
      recipe.seq_len, final_steps=recipe.final_steps, warmup_steps_per_stage=recipe.warmup_steps,
      global_batch_size=recipe.global_batch, max_tokens_per_micro_batch=recipe.max_tokens)
  config.model.dtype = "bfloat16"
  config.model.remat = recipe.remat
  config.model.scan_layers = recipe.scan_layers
  if name == "large-1m":  # few, long evaluations and frequent checkpoints
    config.eval.batch_size = 8
    config.eval.num_batches = 4
    config.eval.every_steps = 2000
    config.checkpoint.every_steps = 500
  return config
