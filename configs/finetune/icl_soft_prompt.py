"""Soft prompting (SPEC 6.2) on GenomicBenchmarks human_nontata_promoters with a frozen LM.

Run:
  python -m hyena_jax.icl --config=configs/finetune/icl_soft_prompt.py --workdir=DIR \
      --config.pretrained=PATH_TO_hyenadna-medium-160k-seqlen \
      --config.data.train=train.tsv --config.data.test=test.tsv
Sweep as the paper: --config.icl.n_soft in {0,2,32,128,512,2048,8192,32768} and
--config.icl.shots in {2,32,128} (demonstrations per class; the context must fit l_max).
Other datasets: set data.max_length (official: mouse 3200, cohn 502, nontata 251, ensembl 320,
regulatory 600 with head.n_classes=3, ocr 420) and data.truncate=True.
Recipe: AdamW lr 1e-3, wd 0, batch 2 x grad-accum 8, clip 1.0, <= 20 epochs, seed 12345.
"""

from hyena_jax import finetune_config


def get_config():
  config = finetune_config.icl_config()
  config.task = "icl_soft_prompt_human_nontata_promoters"
  config.icl.mode = "soft_prompt"
  config.data.max_length = 251
  config.data.truncate = True
  config.model.update(d_model=256, n_layer=8, d_inner=1024, l_max=160_002)  # medium-160k
  return config
