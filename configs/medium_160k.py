"""medium_160k: HyenaDNA medium-160k pretraining on hg38 (SPEC sections 4-5).

Run (after launch/prepare_hg38.sh has written data/hg38/):
  python -m hyena_jax.main --config=configs/medium_160k.py --workdir=DIR
Hardware: 8 x 80 GB GPUs or a TPU v5p-16. Lower config.train.stages' grad_accum or raise it to fit memory; the global
batch (64 sequences) stays fixed. Expect: valid perplexity ~2.8 on hg38 (paper Fig. 3).
"""

from hyena_jax import run_config


def get_config():
  config = run_config.release_config("medium-160k")
  config.data.fasta = "data/hg38/hg38.ml.fa"
  config.data.bed = "data/hg38/human-sequences.bed"
  config.data.num_workers = 4
  config.train.global_batch_size = 64
  # Warm-up from 64 bases, doubling per stage, to 160_000 (micro-batches <= 524_288 tokens).
  config.train.stages = run_config.warmup_stages(
      160000, final_steps=20000, warmup_steps_per_stage=1000, global_batch_size=64,
      max_tokens_per_micro_batch=524288)
  config.model.dtype = "bfloat16"
  config.model.remat = "block"
  # One block's temporaries at a time: layers run as a lax.scan over stacked weights.
  config.model.scan_layers = True
  return config
