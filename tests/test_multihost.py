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
import subprocess
import sys

import cluster
import numpy as np
import pytest
from cluster import ROOT, STEPS

from hyena_jax.data import pretraining as data
from hyena_jax.errors import InputError
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import distributed

from gcs_server import gcs, objects  # noqa: F401  (gcs: a fixture)

from hyena_jax import storage


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
  text = log.read_text()
  assert "process 1 exited with status 137; stopping the others" in text
  # The survivor says so in one line (its collective failed, or the launcher's SIGTERM came
  # first and it stopped), never with a traceback.
  assert "Traceback" not in text, text[-4000:]
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


def test_a_silent_process_stops_the_others_after_the_heartbeat_timeout(tmp_path):
  """A process that stops answering (SIGSTOP: hung, not dead, so its sockets stay open and gloo
  gets no error) is declared dead by the coordination service after --heartbeat_timeout_s, and
  the survivor exits non-zero instead of waiting in its collective: the path that accelerator
  interconnects, which report no closed connection, take."""
  workdir, log = tmp_path / "run", tmp_path / "log.txt"
  proc = cluster.launch(workdir, log, 2, 2, flags=["--heartbeat_timeout_s=5"])
  pids = [int(p) for p in cluster.wait_for(log, r"pids \[(\d+), (\d+)\]", proc).groups()]
  cluster.wait_for(log, r"\] step 3/10 ", proc)
  os.kill(pids[1], signal.SIGSTOP)
  try:
    # Without the heartbeat, process 0 would wait in its next collective for ever.
    status = proc.wait(timeout=90)
  finally:
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  text = log.read_text()
  assert status != 0, text[-4000:]
  # JAX's own verdict, from process 0: the silent process is named.
  assert re.search(r"\[p0\].*stopped sending heartbeats", text), text[-4000:]
  assert re.search(r"process 0 exited with status (?!0)\d+; stopping the others", text), \
      text[-4000:]
  assert 2 <= ckpt_lib.latest_step(workdir) < STEPS   # step 2 was saved before step 3 began


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


# gs:// workdirs: the same 2-process run with its workdir in a bucket (fake-gcs-server), compared
# with the uninterrupted local run. Here rather than in test_gcs.py so that one pytest-xdist
# worker (--dist loadfile) computes the session fixture `uninterrupted` once.


@pytest.fixture(scope="module")
def gs_run(gcs, tmp_path_factory):
  """The 2-process x 2-device rehearsal with a gs:// workdir, from an empty local working
  directory: one process SIGKILLed mid-run (the launcher stops the other), then the same command
  again on "new VMs" (nothing local survives; only the bucket)."""
  root = tmp_path_factory.mktemp("gs_run")
  cwd = root / "cwd"
  cwd.mkdir()
  url, log = f"{gcs}/runs/two", root / "killed.log"
  proc = cluster.launch(url, log, 2, 2, cwd=cwd)
  pids = [int(p) for p in cluster.wait_for(log, r"pids \[(\d+), (\d+)\]", proc).groups()]
  cluster.wait_for(log, r"\] step 6/10 ", proc)   # step 5 is saved (synchronous saves)
  os.kill(pids[1], signal.SIGKILL)
  assert proc.wait(timeout=120) == 128 + signal.SIGKILL, log.read_text()[-4000:]
  killed_after = ckpt_lib.latest_step(url)
  at_kill = objects(f"{url}/checkpoints/{killed_after}")
  cluster.run(url, root / "resumed.log", 2, 2, cwd=cwd)
  return {"url": url, "cwd": cwd, "root": root, "killed_after": killed_after,
          "at_kill": at_kill}


def test_a_killed_gs_run_resumes_from_the_bucket_and_ends_like_local_disk(gs_run, uninterrupted):
  url, local = gs_run["url"], uninterrupted / "two"
  killed_after = gs_run["killed_after"]
  assert 5 <= killed_after < STEPS
  # Each process wrote its own array shards and data iterator state to the bucket.
  for name in ("data/process_0-of-2.json", "data/process_1-of-2.json"):
    assert name in gs_run["at_kill"], sorted(gs_run["at_kill"])
  assert {n.split("/")[1] for n in gs_run["at_kill"] if n.startswith("params/ocdbt.process_")} \
      == {"ocdbt.process_0", "ocdbt.process_1"}
  log = (gs_run["root"] / "resumed.log").read_text()
  assert f"resumed from {url} at step {killed_after}" in log
  assert cluster.losses(url) == cluster.losses(local)           # every step's metrics, bitwise
  sums, params = cluster.final(url)
  sums_local, params_local = cluster.final(local)
  assert sums == sums_local                                       # params and optimizer state
  for a, b in zip(params, params_local):
    np.testing.assert_array_equal(a, b)
  in_bucket = objects(url)
  print("\nin the bucket after the run (without array chunks):\n  " + "\n  ".join(
      f"{name} {size}" for name, (size, _) in sorted(in_bucket.items()) if "/d/" not in name))
  for name in ("metrics.jsonl", "final_metrics.json", "curves.png",
               "checkpoints/10/params/_METADATA", "checkpoints/10/commit_success.txt",
               "checkpoints/9/data/process_1-of-2.json"):
    assert name in in_bucket, sorted(in_bucket)
  assert sum(name.startswith("tensorboard/events.out.tfevents") for name in in_bucket) >= 1
  # keep_last=3: older steps were deleted from the bucket.
  assert {n.split("/")[1] for n in in_bucket if n.startswith("checkpoints/")} == {"8", "9", "10"}
  final = json.loads(storage.resolve(url + "/final_metrics.json").read_text())
  assert final == json.loads((local / "final_metrics.json").read_text())
  assert list(gs_run["cwd"].iterdir()) == []                     # nothing written locally


def test_rerunning_a_finished_gs_run_says_so_and_changes_nothing(gs_run):
  url, log = gs_run["url"], gs_run["root"] / "finished.log"
  before = objects(url)
  cluster.run(url, log, 1, 4, cwd=gs_run["cwd"])  # any number of processes may ask
  assert "the run finished at step 10; nothing to do" in log.read_text()
  assert objects(url) == before                                 # same objects, same generations
  assert list(gs_run["cwd"].iterdir()) == []


def _cli(args, cwd, env=None):
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_export_and_embed_read_the_run_from_the_bucket(gs_run, uninterrupted, tmp_path):
  url, local = gs_run["url"], uninterrupted / "two"
  # Export from the bucket into the bucket, and from local disk to local disk: the same bytes.
  out = f"{gs_run['url'].rsplit('/runs/', 1)[0]}/exports/two"
  result = _cli(["hyena_jax.export", f"--model={url}", f"--output={out}"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  result = _cli(["hyena_jax.export", f"--model={local}", f"--output={tmp_path / 'export'}"],
                tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(objects(out)) == ["config.json", "model.safetensors"]
  for name in ("config.json", "model.safetensors"):
    assert storage.resolve(f"{out}/{name}").read_bytes() == (tmp_path / "export" / name).read_bytes()
  # A second export into the same place is refused (as on local disk).
  result = _cli(["hyena_jax.export", f"--model={url}", f"--output={out}"], tmp_path)
  assert result.returncode == 2 and "exists; choose another --output or pass --overwrite" in \
      result.stderr

  fasta = tmp_path / "seqs.fa"
  fasta.write_text(">a\nACGTACGTTTGACCA\n>b\nGGGATTACAGATTACAC\n")
  embeddings = {}
  for where, model in (("gs", url), ("local", local)):
    output = tmp_path / f"{where}.npz"
    result = _cli(["hyena_jax.embed", f"--model={model}", f"--input={fasta}",
                   f"--output={output}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    embeddings[where] = dict(np.load(output))
  assert embeddings["gs"]["embeddings"].shape[0] == 2
  for key, value in embeddings["local"].items():
    np.testing.assert_array_equal(embeddings["gs"][key], value, err_msg=key)
