"""Few-shot instruction fine-tuning (SPEC 6.3) on GenomicBenchmarks human_nontata_promoters.

Every weight of the pretrained LM is tuned on `icl.train_examples` rows ({2, 16, 64, 256} in the
paper), each shown with `icl.shots` demonstrations per class ({0, 2, 16, 32}).
Run:
  python -m hyena_jax.icl --config=configs/finetune/icl_instruction.py --workdir=DIR \
      --config.pretrained=PATH_TO_hyenadna-medium-160k-seqlen \
      --config.data.train=train.tsv --config.data.test=test.tsv --config.icl.train_examples=16
Recipe: AdamW lr 1e-4, wd 0, batch 2, clip 1.0, one epoch.
"""

from hyena_jax import finetune_config


def get_config():
  config = finetune_config.icl_config()
  config.task = "icl_instruction_human_nontata_promoters"
  config.icl.mode = "instruction"
  config.icl.train_examples = 16
  config.icl.grad_accum = 1
  config.train.epochs = 1
  config.optim.learning_rate = 1e-4
  config.data.max_length = 251
  config.data.truncate = True
  config.model.update(d_model=256, n_layer=8, d_inner=1024, l_max=160_002)  # medium-160k
  return config
