"""Nucleotide Transformer benchmark splice_sites_donors: 2-class classification, metric macro_f1.

Data: the task's train/test files as TSV `seq<TAB>label` (sequences up to 600 bp).
Run:
  python -m hyena_jax.finetune --config=configs/finetune/nt_splice_sites_donors.py --workdir=DIR \
      --config.data.train=train.tsv --config.data.test=test.tsv \
      [--config.pretrained=PATH_TO_hyenadna-tiny-1k-seqlen-d256]
Recipe (SPEC 6.1): tiny-1k-d256 (d_model 256, 2 layers), mean pooling, AdamW 6e-4, batch 128.
The paper's per-task launch settings are not public; expect roughly the paper's NT table.
"""

from hyena_jax import finetune_config


def get_config(recipe: str = "official"):
  return finetune_config.task_config("nt_splice_sites_donors", max_length=600, n_classes=2,
                                     metric="macro_f1", model="tiny-1k-d256", recipe=recipe)
