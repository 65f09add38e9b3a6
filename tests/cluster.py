"""Runs of `python -m hyena_jax.main --distributed` under launch/local_cluster.py, shared by the
multi-process tests (local disk) and the gs:// tests (a storage emulator): one tiny model
(d_model 64, so the MLP kernels are FSDP-sharded), mesh data=2 x fsdp=2, 10 steps across a
warm-up stage boundary (2 steps at length 64, then 8 at 128 with 2 micro-batches), a checkpoint
every step. Workdirs may be local folders or gs:// URLs: run files are read through epath.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np
from etils import epath
from flax import nnx

from hyena_jax.training import checkpoint as ckpt_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
OVERRIDES = {"model.d_model": 64, "model.n_layer": 2, "model.d_inner": 256,
             "model.filter_order": 16, "model.l_max": 130, "train.global_batch_size": 8,
             "train.stages": "((2,64,1),(8,128,2))", "train.log_every_steps": 1,
             "optim.learning_rate": 3e-3, "eval.every_steps": 0, "eval.num_batches": 1,
             "eval.batch_size": 8, "checkpoint.every_steps": 1, "checkpoint.async_save": False,
             "mesh.data": 2, "mesh.fsdp": 2}


def launch(workdir, log, num_processes, devices, cwd=None, flags=()):
  cmd = [sys.executable, str(ROOT / "launch" / "local_cluster.py"),
         f"--num_processes={num_processes}", f"--devices_per_process={devices}", "--grace_s=5",
         "--", sys.executable, "-m", "hyena_jax.main", "--distributed", f"--workdir={workdir}",
         *flags]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  # The compilation cache: the checkout's own (conftest sets JAX_COMPILATION_CACHE_DIR).
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  with open(log, "w") as out:
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def run(workdir, log, num_processes, devices, cwd=None):
  """Runs to the end (exit 0 asserted); returns the wall time."""
  start = time.perf_counter()
  rc = launch(workdir, log, num_processes, devices, cwd).wait(timeout=300)
  assert rc == 0, pathlib.Path(log).read_text()[-4000:]
  return time.perf_counter() - start


def wait_for(log, pattern, proc, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    match = re.search(pattern, pathlib.Path(log).read_text())
    if match:
      return match
    assert proc.poll() is None, pathlib.Path(log).read_text()[-4000:]
    time.sleep(0.05)
  raise AssertionError(f"{pattern!r} not in {log} after {timeout} s")


def losses(workdir):
  """{step: training metrics row} (the last row written for a step wins, as after a resume)."""
  rows = {}
  for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "loss" in row:
      row.pop("tokens_per_s")
      rows[row["step"]] = row
  return rows


def final(workdir):
  """(fingerprints of params and opt_state, parameter leaves) of the last checkpoint."""
  sums = ckpt_lib.read_json_item(workdir, STEPS, "progress")["fingerprints"]
  model, _, step = ckpt_lib.restore_model(workdir)
  assert step == STEPS
  return sums, [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]
