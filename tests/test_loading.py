"""hyena_jax.load: every official layout, orbax runs, a Hub cache without network, bad sources."""

import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from flax import nnx

import hyena_jax
from conftest import shared_path
from hyena_jax.errors import InputError, MissingInputError
from hyena_jax.interop import convert, formats, loading
from hyena_jax.model.hyenadna import HyenaLM, SequenceClassifier

REPO = "LongSafari/hyenadna-tiny-1k-seqlen-hf"
SHA = "0123456789abcdef0123456789abcdef01234567"


def _assert_same_params(a, b):
  for x, y in zip(*(sorted(nnx.to_flat_state(nnx.state(m, nnx.Param)), key=lambda kv: kv[0])
                    for m in (a, b)), strict=True):
    assert x[0] == y[0]
    np.testing.assert_array_equal(np.asarray(x[1][...]), np.asarray(y[1][...]))


@pytest.mark.parametrize("name,kind,n_classes", [("tiny_1k", "hf", 0),
                                                 ("small_ckpt_shift0", "lightning", 0),
                                                 ("tiny1k_classifier", "standalone", 2)])
def test_official_folder_gives_model_config_and_origin(name, kind, n_classes):
  folder = shared_path("parity", name)
  loaded = hyena_jax.load(folder)
  assert (loaded.kind, loaded.n_classes, loaded.repo_id, loaded.step) == (kind, n_classes, None,
                                                                         None)
  assert os.path.dirname(loaded.path) == str(folder)
  assert isinstance(loaded.model, SequenceClassifier if n_classes else HyenaLM)
  assert loaded.pooling == ("mean" if n_classes else "")
  assert loaded.config.n_layer == len(loaded.model.backbone.layers)


@pytest.mark.parametrize("src,dst", [("small_ckpt_shift0/weights.ckpt", "last.ckpt"),
                                     ("tiny1k_classifier/weights.pt", "pytorch_model.bin")])
def test_every_official_file_name_is_found_in_a_folder(tmp_path, src, dst):
  """last.ckpt (a Lightning run's output) and pytorch_model.bin (HF torch) are in the one list."""
  original = shared_path("parity", src)
  shutil.copy(original, tmp_path / dst)
  shutil.copy(original.parent / "config.json", tmp_path / "config.json")
  loaded = hyena_jax.load(tmp_path)
  assert loaded.path == str(tmp_path / dst)
  _assert_same_params(loaded.model, hyena_jax.load(original).model)


def test_safetensors_is_preferred_to_torch_pickles():
  assert formats.WEIGHT_FILES.index("model.safetensors") < formats.WEIGHT_FILES.index(
      "pytorch_model.bin")
  assert formats.WEIGHT_FILES.index("weights.ckpt") < formats.WEIGHT_FILES.index(
      "pytorch_model.bin")


def test_orbax_run_with_dtype_override(tmp_path):
  official = hyena_jax.load(shared_path("parity", "tiny_1k"))
  convert.convert(official.path, str(tmp_path / "run"), step=3)
  loaded = hyena_jax.load(tmp_path / "run", dtype="bfloat16")
  assert (loaded.kind, loaded.step, loaded.config.dtype) == ("orbax", 3, "bfloat16")
  assert loaded.model.backbone.layers[0].dtype == np.dtype("bfloat16")
  _assert_same_params(loaded.model, official.model)  # float32 parameters, unchanged
  with pytest.raises(MissingInputError, match="no checkpoint for step 7"):
    hyena_jax.load(tmp_path / "run", step=7)
  with pytest.raises(InputError, match="step=3 only applies to orbax runs"):
    hyena_jax.load(official.path, step=3)


def _hub_cache(root, files=("config.json", "weights.safetensors")):
  """The folder layout huggingface_hub writes: refs/main -> a commit, snapshots/<commit>/files."""
  repo = root / ("models--" + REPO.replace("/", "--"))
  snapshot = repo / "snapshots" / SHA
  snapshot.mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(SHA)
  for name in files:
    target = "model.safetensors" if name == "weights.safetensors" else name
    shutil.copy(shared_path("parity", "tiny_1k", name), snapshot / target)
  return snapshot


def test_hub_id_from_the_local_cache_offline(tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  snapshot = _hub_cache(tmp_path)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  loaded = hyena_jax.load(REPO)
  assert (loaded.repo_id, loaded.revision, loaded.kind) == (REPO, SHA, "hf")
  assert loaded.path == str(snapshot / "model.safetensors")
  _assert_same_params(loaded.model, hyena_jax.load(shared_path("parity", "tiny_1k")).model)
  assert hyena_jax.load(REPO, revision=SHA).revision == SHA
  with pytest.raises(MissingInputError, match="not in the Hub cache .* HF_HUB_OFFLINE"):
    hyena_jax.load(REPO, revision="v2")
  with pytest.raises(MissingInputError, match="not in the Hub cache"):
    hyena_jax.load("LongSafari/hyenadna-large-1m-seqlen-hf")


def test_hub_download_call(tmp_path, monkeypatch):
  """Online: snapshot_download is asked for the repo at the revision, config + weights only."""
  snapshot = _hub_cache(tmp_path)
  calls = []

  def snapshot_download(repo_id, *, revision, cache_dir, local_files_only, allow_patterns):
    calls.append((repo_id, revision, cache_dir, local_files_only, tuple(allow_patterns)))
    return str(snapshot)

  errors = types.ModuleType("huggingface_hub.errors")
  for name in ("LocalEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
               "HfHubHTTPError"):
    setattr(errors, name, type(name, (Exception,), {}))
  hub = types.ModuleType("huggingface_hub")
  hub.snapshot_download, hub.errors = snapshot_download, errors
  monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
  monkeypatch.setitem(sys.modules, "huggingface_hub.errors", errors)
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  loaded = hyena_jax.load(REPO, revision="main")
  assert calls == [(REPO, "main", None, False, ("config.json", *formats.WEIGHT_FILES))]
  assert (loaded.repo_id, loaded.revision) == (REPO, SHA)


def test_missing_hub_package_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)
  with pytest.raises(InputError, match=r"needs huggingface_hub \(a dependency of hyena_jax\): "
                                       "pip install huggingface_hub"):
    hyena_jax.load(REPO)


def test_bad_sources_say_what_was_expected(tmp_path):
  with pytest.raises(MissingInputError, match=r"no such file or folder: .*nope/model\.safetensors "
                                              r"\(its folder .*nope does not exist either\)"):
    hyena_jax.load(tmp_path / "nope" / "model.safetensors")
  with pytest.raises(MissingInputError, match="neither an existing path nor a Hub repo id"):
    hyena_jax.load("not a/repo id")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(MissingInputError, match=r"holds no model: .*no checkpoints/.*"
                                              r"model\.safetensors.*\['notes\.txt'\]"):
    hyena_jax.load(tmp_path)
  with pytest.raises(InputError, match="revision='main' only applies to Hub repo ids"):
    hyena_jax.load(tmp_path, revision="main")
  with pytest.raises(InputError, match="no model given"):
    hyena_jax.load("")


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
  """A source shaped like a path that does not exist is answered locally (no Hub, no network),
  naming the closest existing name."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # any Hub attempt would say so
  (tmp_path / "runs" / "default").mkdir(parents=True)
  cases = {"runs/defualt": "no such file or folder: runs/defualt; did you mean runs/default?",
           "runs/nothere": "no such file or folder: runs/nothere; runs holds: default",
           "./tiny/weights.ckpt": r"no such file or folder: \./tiny/weights\.ckpt \(its folder "
                                  r"\./tiny does not exist either\)",
           "model.safetensors": r"no such file or folder: model\.safetensors; \. holds: runs",
           "a/b/c": r"no such file or folder: a/b/c \(its folder a/b does not exist either\)"}
  for source, message in cases.items():
    with pytest.raises(MissingInputError, match=message):
      hyena_jax.load(source)
  assert not loading.looks_like_path(REPO) and not loading.looks_like_path("org/model-v1.5")


def test_the_first_install_loads_safetensors_without_torch(tmp_path):
  """Safetensors and Hub ids need only the base install: a subprocess in which `import torch`
  fails loads the -hf fixture, exports an orbax run to the hf layout and loads that back."""
  folder = shared_path("parity", "tiny_1k")
  blocked = tmp_path / "no_torch" / "torch"
  blocked.mkdir(parents=True)
  (blocked / "__init__.py").write_text("raise ImportError('torch is not installed')\n")
  script = f"""
import numpy as np, hyena_jax
from hyena_jax.interop import convert
from hyena_jax.interop import export
from hyena_jax.interop import formats
from hyena_jax import cli
try:
  import torch
  raise SystemExit("torch imported")
except ImportError:
  pass
loaded = hyena_jax.load({str(folder)!r})
convert.convert({str(folder)!r}, {str(tmp_path / "run")!r})
export.export({str(tmp_path / "run")!r}, {str(tmp_path / "hf")!r})
again = hyena_jax.load({str(tmp_path / "hf")!r})
ids = np.array([[7, 8, 9, 10]], np.int32)
np.testing.assert_array_equal(np.asarray(loaded.model(ids)), np.asarray(again.model(ids)))
print("ok", loaded.kind, again.kind)
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked.parent), root])}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["ok", "hf", "hf"]
