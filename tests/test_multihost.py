"""Real multi-process runs on one machine (launch/local_cluster.py): 2 JAX processes x 2 fake CPU
devices joined by jax.distributed (gloo collectives over localhost) train like 1 process x 4
devices, checkpoint together, survive SIGTERM and SIGKILL, and resume.

Every run is `python -m hyena_jax.main --distributed` on the same tiny model (d_model 64, so the
MLP kernels are FSDP-sharded), mesh data=2 x fsdp=2, 10 steps across a warm-up stage boundary
(2 steps at length 64, then 8 at 128 with 2 micro-batches), a checkpoint every step.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from hyena_jax import checkpoint as ckpt_lib
from hyena_jax import data, distributed
from hyena_jax.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 10
OVERRIDES = {"model.d_model": 64, "model.n_layer": 2, "model.d_inner": 256,
             "model.filter_order": 16, "model.l_max": 130, "train.global_batch_size": 8,
             "train.stages": "((2,64,1),(8,128,2))", "train.log_every_steps": 1,
             "optim.learning_rate": 3e-3, "eval.every_steps": 0, "eval.num_batches": 1,
             "eval.batch_size": 8, "checkpoint.every_steps": 1, "checkpoint.async_save": False,
             "mesh.data": 2, "mesh.fsdp": 2}


def _launch(workdir, log, num_processes, devices):
  cmd = [sys.executable, str(ROOT / "launch" / "local_cluster.py"),
         f"--num_processes={num_processes}", f"--devices_per_process={devices}", "--grace_s=5",
         "--", sys.executable, "-m", "hyena_jax.main", "--distributed", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR="/tmp/hyena_jax_test_compile_cache",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  with open(log, "w") as out:
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _run(workdir, log, num_processes, devices):
  start = time.perf_counter()
  rc = _launch(workdir, log, num_processes, devices).wait(timeout=300)
  assert rc == 0, pathlib.Path(log).read_text()[-4000:]
  return time.perf_counter() - start


def _wait_for(log, pattern, proc, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    match = re.search(pattern, pathlib.Path(log).read_text())
    if match:
      return match
    assert proc.poll() is None, pathlib.Path(log).read_text()[-4000:]
    time.sleep(0.05)
  raise AssertionError(f"{pattern!r} not in {log} after {timeout} s")


def _losses(workdir):
  """{step: training metrics row} (the last row written for a step wins, as after a resume)."""
  rows = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    if "loss" in row:
      row.pop("tokens_per_s")
      rows[row["step"]] = row
  return rows


def _final(workdir):
  """(fingerprints of params and opt_state, parameter leaves) of the last checkpoint."""
  sums = ckpt_lib.read_json_item(workdir, STEPS, "progress")["fingerprints"]
  model, _, step = ckpt_lib.restore_model(workdir)
  assert step == STEPS
  return sums, [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model)))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  times = {"one": _run(root / "one", root / "one.log", 1, 4),
           "two": _run(root / "two", root / "two.log", 2, 2)}
  print(f"\nwall time of the uninterrupted run: 1 process x 4 devices {times['one']:.1f} s, "
        f"2 processes x 2 devices {times['two']:.1f} s")
  return root


def test_two_processes_train_like_one(uninterrupted):
  one, two = uninterrupted / "one", uninterrupted / "two"
  log = (uninterrupted / "two.log").read_text()
  assert "JAX process 1/2" in log and "[p1] " in log
  assert "mesh {'data': 2, 'fsdp': 2, 'sequence': 1}" in log
  # Metrics come from process 0 only: one row per step, the same final metrics.
  rows_one, rows_two = _losses(one), _losses(two)
  assert sorted(rows_two) == list(range(1, STEPS + 1))
  assert sum('"loss"' in line for line in open(two / "metrics.jsonl")) == STEPS
  for step in rows_one:
    for key in rows_one[step]:
      np.testing.assert_allclose(rows_two[step][key], rows_one[step][key], rtol=1e-6,
                                 err_msg=f"step {step} {key}")
  sums_one, params_one = _final(one)
  sums_two, params_two = _final(two)
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
  params_dir = ckpt_lib.step_dir(two, STEPS) + "/params"
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(params_dir))


def test_sigterm_then_sigkill_then_rerun_finishes_like_an_uninterrupted_run(uninterrupted,
                                                                             tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "log.txt"

  # 1. SIGTERM to the launcher (a preemption): every process stops after the same step, saves
  # it together (data iterator state of both processes included) and exits 143.
  proc = _launch(workdir, log, 2, 2)
  _wait_for(log, r"\] step 1/10 ", proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-4000:]
  text = log.read_text()
  stops = {p: int(s) for p, s in re.findall(r"\[p(\d)\].*interrupted at step (\d+)/10", text)}
  assert set(stops) == {"0", "1"} and len(set(stops.values())) == 1, text[-4000:]
  stopped = stops["0"]
  assert ckpt_lib.latest_step(workdir) == stopped
  if stopped != 2:  # inside a stage: the iterator of every process is saved
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(
        os.listdir(ckpt_lib.step_dir(workdir, stopped) + "/data"))

  # 2. SIGKILL one process mid-run: the launcher stops the other one and fails with 137.
  proc = _launch(workdir, log, 2, 2)
  pids = [int(p) for p in _wait_for(log, r"pids \[(\d+), (\d+)\]", proc).groups()]
  _wait_for(log, rf"\] step {stopped + 2}/10 ", proc)  # step stopped + 1 is saved
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
  proc = _launch(workdir, log, 2, 2)
  assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
  assert f"resumed from {workdir} at step {killed_after}" in log.read_text()
  two = uninterrupted / "two"
  assert _losses(workdir) == _losses(two)
  sums, params = _final(workdir)
  sums_two, params_two = _final(two)
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
