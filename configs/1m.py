"""large-1m: HyenaDNA 1M-token pretraining on hg38 (8 layers, d_model 256, l_max 1,000,002).

The row "large-1m" of configs/hg38.py (its docstring has the recipe and the hardware):
  python -m hyena_jax.main --config=configs/1m.py --workdir=gs://BUCKET/run   # every host
  python -m hyena_jax.aot --config=configs/1m.py --target=h100                # memory first
"""

import os
import runpy

_HG38 = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hg38.py"))


def get_config():
  return _HG38["get_config"]("large-1m")
