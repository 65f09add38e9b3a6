"""Real multi-process runs on one machine (launch/local_cluster.py): 2 JAX processes x 2 fake CPU
devices joined by jax.distributed (gloo collectives over localhost) train like 1 process x 4
devices, checkpoint together, survive SIGTERM and SIGKILL, and resume.

Every run is `python -m hyena_jax.main --distributed` on the same tiny model (`cluster.py`); the
uninterrupted runs are the session fixture `uninterrupted` (conftest.py), shared with test_gcs.
"""

import json
import os
import re
import signal

import cluster
import numpy as np
import pytest
from cluster import STEPS

from hyena_jax.data import pretraining as data
from hyena_jax.errors import InputError
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import distributed


def test_two_processes_train_like_one(uninterrupted):
  one, two = uninterrupted / "one", uninterrupted / "two"
  log = (uninterrupted / "two.log").read_text()
  assert "JAX process 1/2" in log and "[p1] " in log
  # Process 0 logs progress and metrics; the others only warnings and errors.
  assert re.search(r"\[p0\] .*\] step 10/10 ", log)
  assert not re.search(r"\[p1\] .*\] step \d+/10 ", log), log[-3000:]
  assert "[Gloo]" not in log  # gloo's connection reports are dropped by the launcher
  assert "mesh {'data': 2, 'fsdp': 2, 'sequence': 1}" in log
  # Metrics come from process 0 only: one row per step, the same final metrics.
  rows_one, rows_two = cluster.losses(one), cluster.losses(two)
  assert sorted(rows_two) == list(range(1, STEPS + 1))
  assert sum('"loss"' in line for line in open(two / "metrics.jsonl")) == STEPS
  for step in rows_one:
    for key in rows_one[step]:
      np.testing.assert_allclose(rows_two[step][key], rows_one[step][key], rtol=1e-6,
                                 err_msg=f"step {step} {key}")
  sums_one, params_one = cluster.final(one)
  sums_two, params_two = cluster.final(two)
  for a, b in zip(params_one, params_two):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
  # The same SPMD program on the same global batch: only the transport of the collectives
  # differs (gloo over TCP between processes), so the result is bitwise the same today.
  print(f"\nbitwise equal: metrics {rows_one == rows_two}, params and optimizer state "
        f"{sums_one == sums_two}")
  final = json.loads((two / "final_metrics.json").read_text())
  assert final["status"] == "finished" and final["step"] == STEPS
  np.testing.assert_allclose(final["valid_loss"],
                             json.loads((one / "final_metrics.json").read_text())["valid_loss"],
                             rtol=1e-6)
  # The FSDP-sharded arrays span both processes: each wrote its own part of the checkpoint.
  params_dir = ckpt_lib.step_dir(two, STEPS) / "params"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(params_dir))


def test_sigterm_then_sigkill_then_rerun_finishes_like_an_uninterrupted_run(uninterrupted,
                                                                             tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "log.txt"

  # 1. SIGTERM to the launcher (a preemption): every process stops after the same step, saves
  # it together (data iterator state of both processes included) and exits 143.
  proc = cluster.launch(workdir, log, 2, 2)
  cluster.wait_for(log, r"\] step 1/10 ", proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-4000:]
  text = log.read_text()
  stops = {p: int(s) for p, s in re.findall(r"\[p(\d)\].*interrupted at step (\d+)/10", text)}
  assert set(stops) == {"0", "1"} and len(set(stops.values())) == 1, text[-4000:]
  stopped = stops["0"]
  assert ckpt_lib.latest_step(workdir) == stopped
  if stopped != 2:  # inside a stage: the iterator of every process is saved
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(ckpt_lib.step_dir(workdir, stopped) / "data"))

  # 2. SIGKILL one process mid-run: the launcher stops the other one and fails with 137.
  proc = cluster.launch(workdir, log, 2, 2)
  pids = [int(p) for p in cluster.wait_for(log, r"pids \[(\d+), (\d+)\]", proc).groups()]
  cluster.wait_for(log, rf"\] step {stopped + 2}/10 ", proc)  # step stopped + 1 is saved
  os.kill(pids[1], signal.SIGKILL)
  assert proc.wait(timeout=120) == 128 + signal.SIGKILL, log.read_text()[-4000:]
  assert "process 1 exited with status 137; stopping the others" in log.read_text()
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)
  killed_after = ckpt_lib.latest_step(workdir)
  assert stopped < killed_after < STEPS

  # 3. The same command again resumes from the last complete checkpoint and finishes exactly
  # as the uninterrupted run did.
  proc = cluster.launch(workdir, log, 2, 2)
  assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
  assert f"resumed from {workdir} at step {killed_after}" in log.read_text()
  two = uninterrupted / "two"
  assert cluster.losses(workdir) == cluster.losses(two)
  sums, params = cluster.final(workdir)
  sums_two, params_two = cluster.final(two)
  assert sums == sums_two
  for a, b in zip(params, params_two):
    np.testing.assert_array_equal(a, b)


def test_process_batches_are_disjoint_blocks_of_the_global_batch():
  """What each process feeds to jax.make_array_from_process_local_data: process p's rows are
  the contiguous block p of the single-process global batch, augmentations included."""
  kw = dict(split="train", seq_len=64, global_batch_size=8, seed=3)
  cfg = data.default_config()
  cfg.rc_aug = cfg.random_offset = True
  single = data.make_pretrain_dataset(cfg, process_index=0, process_count=1, **kw)
  hosts = [data.make_pretrain_dataset(cfg, process_index=p, process_count=2, **kw)
           for p in range(2)]
  for batch, *parts in zip(single, *hosts):
    for key in batch:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
    rows = [{bytes(r) for r in p["inputs"]} for p in parts]
    assert len(rows[0]) == len(rows[1]) == 4 and not rows[0] & rows[1]
    break


def test_cluster_environment_is_all_or_nothing():
  env = {distributed.COORDINATOR: "localhost:1234", distributed.NUM_PROCESSES: "2",
         distributed.PROCESS_ID: "1"}
  assert distributed.cluster_from_env(env) == {
      "coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
  assert distributed.cluster_from_env({}) is None
  with pytest.raises(InputError, match="HYENA_JAX_PROCESS_ID not"):
    distributed.cluster_from_env({k: v for k, v in env.items() if k != distributed.PROCESS_ID})
  with pytest.raises(InputError, match=r"must lie in \[0, "):
    distributed.cluster_from_env({**env, distributed.PROCESS_ID: "2"})
