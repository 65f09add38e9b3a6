"""Run lifecycle: finished reruns, metrics.jsonl repair, NaN advice, damaged checkpoints, signals.

Every run uses test_train's tiny config with its already compiled shapes (2 steps at length 64,
or its default two stages), so the persistent compile cache makes most runs cache hits.
"""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from test_train import tiny_config

from hyena_jax.errors import InputError
from hyena_jax.interop import loading
from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import metrics_writer
from hyena_jax.training import pretrain as train
from hyena_jax.training import resume, steps

TWO_STEPS = ((2, 64, 1),)


def _snapshot(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]


def _steps(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def test_rerunning_a_finished_run_reports_it_and_changes_nothing(tmp_path, caplog):
  config = tiny_config(stages=TWO_STEPS)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["status"] == "finished" and final["step"] == 2 and "valid_loss" in final
  before = _snapshot(tmp_path)
  assert json.loads(before["final_metrics.json"]) == final
  caplog.set_level("INFO")
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again == final
  assert "the run finished at step 2; nothing to do" in caplog.text
  assert _snapshot(tmp_path) == before           # every file byte-identical, none added
  # Killed between the last checkpoint and final_metrics.json: the rerun writes the same file.
  (tmp_path / "final_metrics.json").unlink()
  assert train.train_and_evaluate(config, str(tmp_path)) == final
  assert (tmp_path / "final_metrics.json").read_bytes() == before["final_metrics.json"]
  # A finished run whose last checkpoint got damaged says so instead of "nothing to do".
  _flip_params_byte(tmp_path / "checkpoints" / "2")
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=r"checkpoint step 2 is damaged: .*"
                     r"2/params.* does not match the checksum"):
    train.train_and_evaluate(config, str(tmp_path))


def test_metrics_jsonl_drops_a_torn_last_line_and_is_rewritten_atomically(tmp_path, caplog,
                                                                          monkeypatch):
  config = tiny_config(stages=TWO_STEPS)
  assert train.train_and_evaluate(config, str(tmp_path), stop_after_steps=1)["status"] == \
      "interrupted"
  path = tmp_path / "metrics.jsonl"
  # A kill while writing step 2's line leaves half of it (no newline) after step 1's.
  with path.open("a") as f:
    f.write('{"step": 2, "loss": 1.2')
  good = path.read_bytes()
  # A kill during the rewrite on resume (here: the rename fails) leaves the old file whole.
  def killed(src, dst):
    raise OSError("killed during the rewrite")
  monkeypatch.setattr(metrics_writer.os, "replace", killed)
  with pytest.raises(OSError, match="killed"):
    metrics_writer.MetricsWriter(str(tmp_path), resume_step=1)
  assert path.read_bytes() == good
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "metrics.jsonl", "tensorboard"]
  monkeypatch.undo()

  caplog.set_level("WARNING")
  final = train.train_and_evaluate(config, str(tmp_path))      # resumes at step 1
  assert final["status"] == "finished"
  assert "dropping its partial last line" in caplog.text
  rows = _rows(tmp_path)                                       # every line parses
  assert [(r["step"], "loss" in r) for r in rows] == [(1, True), (2, True), (2, False)]


def test_a_nan_stop_says_how_to_resume_with_a_lower_learning_rate(tmp_path, monkeypatch):
  config = tiny_config(stages=TWO_STEPS)
  train.train_and_evaluate(config, str(tmp_path), stop_after_steps=1)     # checkpoint 1
  # Step 2 diverges (a poisoned loss stands in for a too-high learning rate).
  make_step = steps.make_train_step
  def poisoned(*args, **kwargs):
    step_fn = make_step(*args, **kwargs)
    def step(state, batch):
      new, metrics = step_fn(state, batch)
      return new, {**metrics, "loss": jnp.where(state["step"] >= 1, jnp.nan, metrics["loss"])}
    return step
  monkeypatch.setattr(steps, "make_train_step", poisoned)
  with pytest.raises(train.DivergedError) as err:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(err.value)
  assert isinstance(err.value, InputError) and isinstance(err.value, FloatingPointError)
  assert "non-finite training metrics" in message and "at step 2" in message
  advice = "--config.optim.learning_rate=0.0015 --allow_changed=optim.learning_rate"
  assert "The checkpoint of step 1 holds finite values" in message and advice in message
  assert _steps(tmp_path) == [1]                  # nothing non-finite was saved
  monkeypatch.undo()

  # Following only half of the advice is refused, saying the other half.
  lower = tiny_config(stages=TWO_STEPS)
  lower.optim.learning_rate = 0.0015
  with pytest.raises(InputError, match="add --allow_changed=optim.learning_rate"):
    train.train_and_evaluate(lower, str(tmp_path))
  with pytest.raises(InputError, match="only optimizer fields may change"):
    train.train_and_evaluate(lower, str(tmp_path), allow_changed=["model.d_model"])
  clip = tiny_config(stages=TWO_STEPS)
  clip.optim.grad_clip = 0.0                      # removes a transform from the optimizer state
  with pytest.raises(InputError, match="changes the structure of the optimizer state"):
    train.train_and_evaluate(clip, str(tmp_path), allow_changed=["optim.grad_clip"])
  assert _steps(tmp_path) == [1]
  # The whole advice resumes from step 1 and records the change with the checkpoint.
  final = train.train_and_evaluate(lower, str(tmp_path), allow_changed=["optim.learning_rate"])
  assert final["status"] == "finished" and final["step"] == 2
  progress = ckpt_lib.read_json_item(str(tmp_path), 2, "progress")
  assert progress["config_changes"] == [{"step": 1, "optim.learning_rate": [0.003, 0.0015]}]
  assert ckpt_lib.read_json_item(str(tmp_path), 2, "config")["optim"]["learning_rate"] == 0.0015


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  """A run of test_train's default tiny config stopped at step 2, with checkpoints 1 and 2."""
  workdir = tmp_path_factory.mktemp("two_checkpoints")
  train.train_and_evaluate(tiny_config(), str(workdir), stop_after_steps=1)
  train.train_and_evaluate(tiny_config(), str(workdir), stop_after_steps=1)
  assert _steps(workdir) == [1, 2]
  return workdir


def _flip_params_byte(step_dir: pathlib.Path) -> None:
  """Flips the bits of one byte in the middle of the largest params data file."""
  data = max((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, named", [
    ("config/metadata", "2/config/metadata is missing"),
    ("data/process_0-of-1.json", "2/data/process_0-of-1.json missing"),
    ("params bytes", "2/params"),
])
def test_a_damaged_latest_checkpoint_is_named_and_can_be_skipped(two_checkpoints, tmp_path,
                                                                 damage, named, caplog):
  workdir = tmp_path / "run"
  shutil.copytree(two_checkpoints, workdir)
  step2 = workdir / "checkpoints" / "2"
  if damage == "params bytes":
    _flip_params_byte(step2)
  else:
    (step2 / damage).unlink()
  before = _snapshot(workdir)
  with pytest.raises(ckpt_lib.DamagedCheckpointError) as err:
    train.train_and_evaluate(tiny_config(), str(workdir), stop_after_steps=1)
  message = str(err.value)
  assert "checkpoint step 2 is damaged" in message and named in message, message
  assert "Re-run with --skip_damaged_checkpoints to resume from step 1" in message
  if damage == "params bytes":       # restores without error: only the checksum catches it
    assert "does not match the checksum saved with it" in message, message
    with pytest.raises(ckpt_lib.DamagedCheckpointError, match="does not match the checksum"):
      ckpt_lib.restore_model(str(workdir), 2)           # as embed, score and generate load it
    with pytest.raises(ckpt_lib.DamagedCheckpointError, match="does not match the checksum"):
      loading.load(str(workdir), step=2)                # as export reads it
  assert _snapshot(workdir) == before                      # refused, nothing changed

  caplog.set_level("WARNING")
  result = train.train_and_evaluate(tiny_config(), str(workdir), stop_after_steps=1,
                                    skip_damaged_checkpoints=True)
  assert result["status"] == "interrupted" and result["step"] == 2       # 1 -> 2 again
  assert "moved damaged checkpoint step 2" in caplog.text
  assert (workdir / "damaged_checkpoints" / "2").is_dir()
  assert _steps(workdir) == [1, 2]
  assert [r["step"] for r in _rows(workdir)] == [1, 2]
  # The redone step 2 equals the original one (same data position, same state).
  redone = ckpt_lib.read_json_item(str(workdir), 2, "progress")["fingerprints"]
  original = json.loads((two_checkpoints / "checkpoints/2/progress/metadata").read_text())
  assert redone == original["fingerprints"]


def test_sigterm_stops_with_a_checkpoint_and_is_recorded_as_interrupted(tmp_path, monkeypatch):
  config = tiny_config(stages=TWO_STEPS)
  to_global_batch = train.data_lib.to_global_batch
  def preempted(*args):   # the scheduler preempts during the first step
    os.kill(os.getpid(), signal.SIGTERM)
    return to_global_batch(*args)
  monkeypatch.setattr(train.data_lib, "to_global_batch", preempted)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["status"] == "interrupted" and result["signal"] == "SIGTERM"
  assert result["step"] == 1 and _steps(tmp_path) == [1]
  assert not (tmp_path / "final_metrics.json").exists()          # nothing that looks complete
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL      # handler removed again
  monkeypatch.undo()
  assert train.train_and_evaluate(config, str(tmp_path))["status"] == "finished"


def test_ctrl_c_during_compile_saves_and_exits_130(tmp_path):
  """README's command in a subprocess with the tiny config: Ctrl-C (SIGINT) while the first step
  compiles waits for that step, saves it and exits 130, without a traceback."""
  overrides = {"model.d_model": 32, "model.n_layer": 2, "model.d_inner": 64,
               "model.filter_order": 16, "model.l_max": 130, "train.global_batch_size": 8,
               "train.stages": "((1000,64,1),)", "train.log_every_steps": 2,
               "optim.learning_rate": 3e-3, "eval.num_batches": 1, "eval.batch_size": 8,
               "checkpoint.async_save": False, "mesh.data": 1}
  cmd = [sys.executable, "-m", "hyena_jax.main", f"--workdir={tmp_path}"] + [
      f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # conftest's cache
  log = tmp_path / "log.txt"
  # A child inherits an ignored SIGINT (CI often runs tests as a background job); a handled one
  # is reset at exec, so the child gets Python's Ctrl-C handling as in a terminal.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with log.open("w") as out:
      proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
  finally:
    signal.signal(signal.SIGINT, previous)
  deadline = time.time() + 120
  while "stage 0:" not in log.read_text() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)             # the first step is compiling now
  rc = proc.wait(timeout=120)
  text = log.read_text()
  assert rc == 130, text[-3000:]
  assert "SIGINT received: saving a checkpoint" in text and "Traceback" not in text
  stopped = re.search(r"interrupted at step (\d+)/1000 by SIGINT", text)
  assert stopped, text[-3000:]
  assert _steps(tmp_path) == [int(stopped.group(1))]   # 1 unless the compile was a cache hit
  assert not (tmp_path / "final_metrics.json").exists()


def test_a_failed_checkpoint_save_stops_the_run_with_one_line_and_keeps_the_last_one(
    tmp_path, monkeypatch):
  """A full disk, injected both ways it reaches the loop: an OSError from the save call itself,
  and tensorstore's RESOURCE_EXHAUSTED surfacing from an asynchronous save at the next step.
  (A drill on a real 3 MB tmpfs gave the same one line; after freeing space the rerun ended
  bitwise equal to an uninterrupted run.)"""
  import errno

  import orbax.checkpoint as ocp

  from hyena_jax import cli
  config = tiny_config(stages=((6, 64, 1),))
  config.checkpoint.every_steps = 2
  config.checkpoint.async_save = True
  save = resume.save_checkpoint

  def full_at_step_4(mngr, run, state, *args, **kwargs):
    if int(state["step"]) == 4:
      raise OSError(errno.ENOSPC, "No space left on device")
    return save(mngr, run, state, *args, **kwargs)

  monkeypatch.setattr(resume, "save_checkpoint", full_at_step_4)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as err:
    train.train_and_evaluate(config, str(tmp_path / "sync"))
  message = str(err.value)
  assert "saving a checkpoint to" in message and "no space left on the device" in message
  assert "MiB free there" in message and "the newest complete checkpoint is step 2" in message
  assert _steps(tmp_path / "sync") == [2]
  assert not (tmp_path / "sync" / "final_metrics.json").exists()
  monkeypatch.undo()

  check = ocp.CheckpointManager.check_for_errors
  calls = []

  def background_failure(self):
    calls.append(1)
    if len(calls) == 2:  # the check before step 4: the save of step 2 failed in the background
      raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding"')
    return check(self)

  monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", background_failure)
  with pytest.raises(ckpt_lib.CheckpointSaveError, match="no space left on the device"):
    train.train_and_evaluate(config, str(tmp_path / "async"))
  rows = [r["step"] for r in _rows(tmp_path / "async")]
  assert max(rows) == 2, rows  # stopped before computing step 4

  # The CLI keeps orbax's background tracebacks of such a failure off the screen.
  record = logging.LogRecord("absl", logging.ERROR, "/x/orbax/checkpoint/future.py", 1, "failed",
                             None, (ValueError, ValueError("RESOURCE_EXHAUSTED: x"), None))
  assert not cli._FILTER.filter(record)
  record.exc_info = (KeyError, KeyError("bug"), None)
  assert cli._FILTER.filter(record)
