"""large-1m: HyenaDNA 1M-token pretraining on hg38 (8 layers, d_model 256, l_max 1,000,002).

Run (after launch/prepare_hg38.sh has written data/hg38/):
  python -m hyena_jax.main --config=configs/1m.py --workdir=gs://BUCKET/run   # every host
Hardware: 8 x 80 GB GPUs (one 1M sequence per GPU per micro-batch, bf16 compute, float32 FFTs,
remat per block) or a TPU v5p-16. Check memory first without hardware:
  python -m hyena_jax.aot --config=configs/1m.py
The paper's recipe: warm-up from 64 bases doubling to 1M, global batch fixed by accumulation,
AdamW 6e-4 with cosine decay. Expect validation perplexity ~2.7-2.8 on hg38 after ~20k steps.
l_max stays the release's 1,000,002: the filter's positional grid depends on it, so changing it
would no longer match the released large-1m weights. A stage of 2^20 = 1,048,576 tokens (the
power-of-two lengths of the memory tables) needs --config.model.l_max=1048578, for a run that
does not start from the released checkpoint; python -m hyena_jax.aot --seq_len raises it itself.
"""

from hyena_jax import run_config


def get_config():
  config = run_config.release_config("large-1m")
  config.data.fasta = "data/hg38/hg38.ml.fa"
  config.data.bed = "data/hg38/human-sequences.bed"
  config.data.num_workers = 8
  config.train.global_batch_size = 8
  # 64 -> 1,000,000 bases; micro-batches of at most one 1M-token sequence per device x 8.
  config.train.stages = run_config.warmup_stages(
      1_000_000, final_steps=20_000, warmup_steps_per_stage=500, global_batch_size=8,
      max_tokens_per_micro_batch=8 * 1_000_000)
  config.model.dtype = "bfloat16"
  config.model.remat = "block"
  # One block's temporaries at a time: layers run as a lax.scan over stacked weights.
  config.model.scan_layers = True
  config.eval.batch_size = 8
  config.eval.num_batches = 4
  config.eval.every_steps = 2000
  config.checkpoint.every_steps = 500
  return config
