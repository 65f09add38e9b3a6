"""Launcher of `python -m hyena_jax.aot` (same flags): compile a config's train step for TPUs or
GPUs you don't have, deviceless, and print what it needs. See hyena_jax/training/aot.py's docstring.

  python launch/aot_compile.py --config=configs/1m.py --target=v5p-8,h100
"""

import os
import runpy
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  runpy.run_module("hyena_jax.aot", run_name="__main__", alter_sys=True)
