"""Nucleotide Transformer benchmark H3K9ac: 2-class classification, metric mcc.

Data: the task's train/test files as TSV `seq<TAB>label` (sequences up to 500 bp).
Run:
  python -m hyena_jax.finetune --config=configs/finetune/nt_H3K9ac.py --workdir=DIR \
      --config.data.train=train.tsv --config.data.test=test.tsv \
      [--config.pretrained=PATH_TO_hyenadna-tiny-1k-seqlen-d256]
Recipe (SPEC 6.1): tiny-1k-d256 (d_model 256, 2 layers), mean pooling, AdamW 6e-4, batch 128.
The paper's per-task launch settings are not public; expect roughly the paper's NT table.
"""

from hyena_jax import finetune_config


def get_config(recipe: str = "official"):
  return finetune_config.task_config("nt_H3K9ac", max_length=500, n_classes=2,
                                     metric="mcc", model="tiny-1k-d256", recipe=recipe)
