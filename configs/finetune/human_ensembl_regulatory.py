"""GenomicBenchmarks human_ensembl_regulatory: 3-class classification, metric accuracy.

Data: the GenomicBenchmarks split exported as TSV `seq<TAB>label` (3 classes; median 401 bp,
longest 802 bp).
Run (1 GPU: minutes; CPU: hours at the full recipe):
  python -m hyena_jax.finetune --config=configs/finetune/human_ensembl_regulatory.py \
      --workdir=DIR --config.data.train=train.tsv --config.data.test=test.tsv \
      [--config.pretrained=PATH_TO_hyenadna-tiny-1k-seqlen]
Recipe (SPEC 6.1): tiny-1k (d_model 128, 2 layers), mean pooling, AdamW 6e-4, batch 128,
100 epochs. Expect: the accuracy of the paper's Table A.4.
"""

from hyena_jax import finetune_config


def get_config(recipe: str = "official"):
  config = finetune_config.task_config(
      "human_ensembl_regulatory", max_length=802, n_classes=3, metric="accuracy", model="tiny-1k",
      recipe=recipe)
  return config
