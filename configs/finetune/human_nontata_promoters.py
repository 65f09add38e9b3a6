"""GenomicBenchmarks human_nontata_promoters: 2-class classification, metric accuracy.

Data: the GenomicBenchmarks split exported as TSV `seq<TAB>label` (all 251 bp).
Run (1 GPU: minutes; CPU: hours at the full recipe):
  python -m hyena_jax.finetune --config=configs/finetune/human_nontata_promoters.py \
      --workdir=DIR --config.data.train=train.tsv --config.data.test=test.tsv \
      [--config.pretrained=PATH_TO_hyenadna-tiny-1k-seqlen]
Recipe (SPEC 6.1): tiny-1k (d_model 128, 2 layers), mean pooling, AdamW 6e-4, batch 128,
100 epochs. Expect: paper Table A.4 (tiny-1k): 96.6 pretrained, 93.3 from scratch.
CPU or small data (a few thousand rows or fewer): the small_data recipe,
  --config=configs/finetune/human_nontata_promoters.py:small_data
(batch 32, AdamW 2e-3, 3 epochs). Measured on 600 rows of the public test split (432 train /
48 valid / 120 test, 3 seeds; benchmarks/bench_finetune.py):
test accuracy 77.5 +- 1.4 from the trained tiny-1k backbone
(parity/tiny1k_classifier), 69.4 +- 0.5 from scratch, 80.0 for 6-mer logistic regression;
majority class 60.8.
"""

from hyena_jax import finetune_config


def get_config(recipe: str = "official"):
  config = finetune_config.task_config(
      "human_nontata_promoters", max_length=251, n_classes=2, metric="accuracy", model="tiny-1k",
      recipe=recipe)
  return config
