"""tiny_1k_d256: HyenaDNA tiny-1k-d256 pretraining on hg38 (SPEC sections 4-5).

Run (after launch/prepare_hg38.sh has written data/hg38/):
  python -m hyena_jax.main --config=configs/tiny_1k_d256.py --workdir=DIR
Hardware: 1 GPU or a TPU v5e-8. Lower config.train.stages' grad_accum or raise it to fit memory; the global
batch (256 sequences) stays fixed. Expect: valid perplexity ~2.9 on hg38.
"""

from hyena_jax import run_config


def get_config():
  config = run_config.release_config("tiny-1k-d256")
  config.data.fasta = "data/hg38/hg38.ml.fa"
  config.data.bed = "data/hg38/human-sequences.bed"
  config.data.num_workers = 4
  config.train.global_batch_size = 256
  # Warm-up from 64 bases, doubling per stage, to 1_024 (micro-batches <= 262_144 tokens).
  config.train.stages = run_config.warmup_stages(
      1024, final_steps=10000, warmup_steps_per_stage=1000, global_batch_size=256,
      max_tokens_per_micro_batch=262144)
  config.model.dtype = "bfloat16"
  config.model.remat = "none"
  return config
