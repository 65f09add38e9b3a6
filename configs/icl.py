"""In-context learning configs (SPEC 6.2-6.3): one table, one row per mode.

Pick a mode (and optionally the released model it starts from) after a colon:
  python -m hyena_jax.icl --config=configs/icl.py:soft_prompt[:MODEL] --workdir=DIR \
      --model=PATH_TO_hyenadna-medium-160k-seqlen \
      --config.data.train=train.tsv --config.data.test=test.tsv
MODEL is a released size (default medium-160k, the paper's); it sets the architecture of a model
trained from scratch (without --model); a pretrained model brings its own.

  * soft_prompt: `icl.n_soft` learnable embeddings before the context, LM frozen; AdamW 1e-3,
    wd 0, batch 2 x grad-accum 8, clip 1.0, <= 20 epochs, seed 12345. Sweep as the paper:
    --config.icl.n_soft in {0,2,32,128,512,2048,8192,32768} and --config.icl.shots in {2,32,128}
    (demonstrations per class; the context must fit l_max).
  * instruction: every weight tuned on `icl.train_examples` rows ({2, 16, 64, 256} in the
    paper), each shown with `icl.shots` demonstrations per class ({0, 2, 16, 32}); AdamW 1e-4,
    wd 0, batch 2, one epoch.
Both default to GenomicBenchmarks human_nontata_promoters (251 bp). Other data sets: set
data.max_length (official: mouse 3200, cohn 502, nontata 251, ensembl 320, regulatory 600 with
head.n_classes=3, ocr 420) and data.truncate=True.
"""

import dataclasses

from hyena_jax.downstream import finetune_config
from hyena_jax.model import config as model_config

# mode -> the fields that differ from finetune_config.icl_config()
MODE = {
    "soft_prompt": {},
    "instruction": {"icl.train_examples": 16, "icl.grad_accum": 1, "train.epochs": 1,
                    "optim.learning_rate": 1e-4},
}


def get_config(spec: str = "soft_prompt"):
  mode, _, model = spec.partition(":")
  if mode not in MODE:
    raise ValueError(f"configs/icl.py:{mode}: no such mode; choose one of {', '.join(MODE)}")
  config = finetune_config.icl_config()
  config.task = f"icl_{mode}_human_nontata_promoters"
  config.icl.mode = mode
  config.data.max_length = 251
  config.data.truncate = True
  config.model.update(dataclasses.asdict(model_config.released(model or "medium-160k")))
  for path, value in MODE[mode].items():
    section, field = path.split(".")
    config[section][field] = value
  return config
