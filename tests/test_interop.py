"""PyTorch interop: export to the official layouts, convert releases back, the torch reference."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import hyena_jax
from conftest import shared_path
from hyena_jax.errors import InputError, OutputExistsError
from hyena_jax.interop import convert, export, formats, loading, weights
from hyena_jax.model import config as config_lib
from hyena_jax.model.hyenadna import HyenaLM, SequenceClassifier
from hyena_jax.training import checkpoint

torch = pytest.importorskip("torch")
from hyena_jax.interop import torch_reference  # noqa: E402  (needs torch)

torch.set_num_threads(2)

TINY = config_lib.HyenaConfig(d_model=16, n_layer=2, d_inner=48, l_max=40, filter_order=8)
FIXTURES = {  # folder: (layout to re-export in, Lightning `.layer.` level)
    "tiny_1k": ("hf", False),
    "small_ckpt_shift0": ("lightning", True),
    "tiny1k_classifier": ("standalone", False),
}


def _params(model: nnx.Module) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten_with_path(a)
  lb, tb = jax.tree.flatten_with_path(b)
  assert ta == tb
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _torch_out(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).numpy()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A tiny LM: step 0 = init (save_model), step 3 = after 3 Adam steps, saved as the training job
  does with its optimizer state beside the parameters (the exporter must ignore it)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  model = HyenaLM(TINY, rngs=nnx.Rngs(0))
  run_config = {"model": TINY.to_dict()}
  checkpoint.save_model(workdir, model, run_config, step=0)
  init = _params(model)
  optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, 12)

  @nnx.jit
  def train_step(model, optimizer, tokens, key):
    def loss_fn(model):
      logits = model(tokens[:, :-1], dropout_key=key)
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  model.train()
  losses = [float(train_step(model, optimizer, tokens, jax.random.key(s))) for s in range(3)]
  assert losses[-1] < losses[0]
  model.eval()
  with checkpoint.make_manager(workdir, keep_best=False, async_save=False) as mngr:
    mngr.save(3, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        opt_state=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState))),
        config=ocp.args.JsonSave(run_config)))
    mngr.wait_until_finished()
  tokens = np.asarray(jax.random.randint(jax.random.key(2), (2, TINY.l_max), 0, 16))
  return workdir, model, init, tokens


# ------------------------------------------------------------------------------------------------
# Trained model -> PyTorch


@pytest.mark.parametrize("layout", ["hf", "lightning", "standalone"])
def test_trained_export_runs_in_torch_with_same_logits(trained_run, tmp_path, layout):
  workdir, model, init, tokens = trained_run
  out = export.export(workdir, str(tmp_path / "out"), layout=layout,
                      checkpoint_mixer=layout == "lightning")
  reference = torch_reference.from_pretrained(out)
  np.testing.assert_allclose(_torch_out(reference, tokens), np.asarray(model(jnp.asarray(tokens))),
                             rtol=1e-4, atol=1e-5)
  # The trained freq moved away from its init: the export carries trained, not initial, weights.
  freq = reference.hyena.backbone.layers[0].mixer.filter_fn.implicit_filter[1].freq.detach()
  assert not np.allclose(freq.numpy(), init["backbone"]["layers"][0]["mixer"]["filter_fn"]["freq"])


def test_hf_files_follow_what_the_hf_client_needs(trained_run, tmp_path):
  from safetensors import safe_open
  workdir, _, _, _ = trained_run
  out = export.export(workdir, str(tmp_path / "hf"))
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
    assert f.metadata() == {"format": "pt"}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  assert len(tensors) == 1 + 26 * TINY.n_layer + 2 + 1
  assert all(v.dtype == np.float32 for v in tensors.values())
  assert not any(".3.freq" in k or ".5.freq" in k for k in tensors)
  np.testing.assert_array_equal(tensors["lm_head.weight"],
                                tensors["hyena.backbone.embeddings.word_embeddings.weight"])
  z = tensors["hyena.backbone.layers.1.mixer.filter_fn.pos_emb.z"]
  assert z.shape == (1, TINY.l_max, TINY.emb_dim)
  np.testing.assert_allclose(z[0, 1, 0], 1 / (TINY.l_max - 1), rtol=1e-6)
  config = json.load(open(os.path.join(out, "config.json")))
  assert config["model_type"] == "hyenadna" and config["max_seq_len"] == TINY.l_max
  assert config["tie_word_embeddings"] is False and config["n_layer"] == TINY.n_layer
  assert config["architectures"] == ["HyenaDNAForCausalLM"]
  assert config["auto_map"]["AutoModelForCausalLM"].endswith("--modeling_hyena.HyenaDNAForCausalLM")
  assert config_lib.from_official(config) == TINY  # our importer reads it back unchanged


def test_export_then_convert_is_identity_and_step_selects(trained_run, tmp_path):
  workdir, model, init, _ = trained_run
  for step, expected in [(None, _params(model)), (0, init)]:
    out = export.export(workdir, str(tmp_path / f"hf{step}"), step=step)
    back = str(tmp_path / f"back{step}")
    convert.convert(out, back)
    restored, run_config, _ = checkpoint.restore_model(back)
    assert checkpoint.model_config(run_config) == TINY
    _assert_trees_equal(_params(restored), expected)


def test_classifier_round_trip_and_refusals(trained_run, tmp_path):
  cfg = TINY.replace(shift=0.0)
  model = SequenceClassifier(cfg, 3, rngs=nnx.Rngs(4))
  model.eval()
  workdir = str(tmp_path / "run")
  checkpoint.save_model(workdir, model, {"model": cfg.to_dict(),
                                         "head": {"n_classes": 3, "pooling": "mean"}})
  with pytest.raises(ValueError, match=r"shift=0.0(.|\n)*classification head"):
    export.export(workdir, str(tmp_path / "hf"))  # -hf hard-codes shift 0.05, has no such head
  assert not os.path.exists(tmp_path / "hf")
  tokens = trained_run[3]
  for layout in ("lightning", "standalone"):
    out = export.export(workdir, str(tmp_path / layout), layout=layout)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["layer"]["shift"] == 0.0 and config["n_classes"] == 3
    sd = formats.read_state_dict(os.path.join(out, formats.WEIGHT_FILE_OF_LAYOUT[layout]))
    head = "decoder.0" if layout == "lightning" else "head"
    assert sd[f"{head}.output_transform.bias"].shape == (3,)
    np.testing.assert_allclose(_torch_out(torch_reference.from_pretrained(out), tokens),
                               np.asarray(model(jnp.asarray(tokens))), rtol=1e-4, atol=1e-5)
    back = str(tmp_path / f"back_{layout}")
    _, run_config = convert.convert(out, back)
    assert run_config["head"] == {"n_classes": 3, "pooling": "mean"}
    assert run_config["model"]["shift"] == 0.0
    _assert_trees_equal(_params(checkpoint.restore_model(back)[0]), _params(model))
  backbone_only = export.export(workdir, str(tmp_path / "lm"), layout="lightning",
                                include_head=False)
  assert "model.lm_head.weight" in formats.read_state_dict(os.path.join(backbone_only,
                                                                        "weights.ckpt"))


# ------------------------------------------------------------------------------------------------
# Official fixtures


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_torch_reference_reproduces_fixture(name):
  """The reference module, written from the spec, on the official files directly."""
  folder = shared_path("parity", name)
  path = loading.find_weights(folder)
  config = json.load(open(folder / "config.json"))
  state = torch_reference.to_hf_keys(torch_reference._read(path))
  tokens = np.load(folder / "tokens.npy")
  if "head.output_transform.weight" in state:
    n_classes = state["head.output_transform.weight"].shape[0]
    model = torch_reference.HyenaDNAClassifier(config, n_classes)
  else:
    model = torch_reference.HyenaDNAForCausalLM(config)
  torch_reference.load_weights(model, state)
  model.eval()
  with torch.no_grad():
    hidden, per_block = model.hyena(torch.from_numpy(tokens), output_hidden_states=True)
    out = model(torch.from_numpy(tokens)).numpy()
  tol = dict(rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(hidden.numpy(), np.load(folder / "hidden.npy"), **tol)
  if name == "tiny1k_classifier":
    np.testing.assert_allclose(out, np.load(folder / "class_logits.npy"), **tol)
  else:
    np.testing.assert_allclose(out, np.load(folder / "logits.npy"), **tol)
    np.testing.assert_allclose(torch.stack(per_block).numpy(), np.load(folder / "layers.npy"),
                               **tol)
  # Its freshly built buffers equal the stored ones (to float32 rounding: the classifier's
  # were made by another PyTorch build).
  fresh = type(model)(config, *([2] if name == "tiny1k_classifier" else [])).state_dict()
  for key in [k for k in state if k.endswith(("pos_emb.z", "pos_emb.t", "deltas"))]:
    np.testing.assert_allclose(fresh[key].numpy(), state[key].numpy(), rtol=0, atol=1e-6,
                               err_msg=key)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_convert_then_export_reproduces_state_dict(name, tmp_path):
  folder = shared_path("parity", name)
  layout, mixer_level = FIXTURES[name]
  original = formats.read_state_dict(loading.find_weights(folder))
  convert.convert(folder, str(tmp_path / "run"))
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"), layout=layout,
                      checkpoint_mixer=mixer_level)
  exported = formats.read_state_dict(os.path.join(out, formats.WEIGHT_FILE_OF_LAYOUT[layout]))
  # Documented aliasing: the pickle layouts also list implicit_filter.3/.5.freq (== .1.freq).
  aliases = {k for k in exported if k.endswith((".3.freq", ".5.freq"))}
  assert set(exported) - aliases == set(original) - aliases
  for key, value in original.items():
    if key.endswith(("pos_emb.z", "pos_emb.t", "modulation.deltas")):
      # Recomputed in float32 by our formulas: equal up to float32 rounding.
      np.testing.assert_allclose(exported[key], value, rtol=0, atol=2e-6, err_msg=key)
    else:
      np.testing.assert_array_equal(exported[key], value, err_msg=key)
  for key in aliases:
    np.testing.assert_array_equal(exported[key], exported[key[:-6] + "1.freq"])
  # export's --model is any hyena_jax.load source: the release itself, with no convert step.
  direct = export.export(folder, str(tmp_path / "direct"), layout=layout,
                         checkpoint_mixer=mixer_level)
  again = formats.read_state_dict(os.path.join(direct, formats.WEIGHT_FILE_OF_LAYOUT[layout]))
  assert set(again) == set(exported)
  for key, value in exported.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)
  # ... and the exported files run in the PyTorch module with the official outputs.
  reference = torch_reference.from_pretrained(out)
  expected = np.load(folder / ("class_logits.npy" if name == "tiny1k_classifier" else "logits.npy"))
  np.testing.assert_allclose(_torch_out(reference, np.load(folder / "tokens.npy")), expected,
                             rtol=1e-4, atol=1e-4)


def test_convert_cli_on_an_hf_release_directory(trained_run, tmp_path):
  """The command line reads an -hf repository as released (config.json with the hub's extra
  keys + model.safetensors) and gives back the exported parameters exactly."""
  workdir, model, _, _ = trained_run
  repo = tmp_path / "hyenadna-tiny-seqlen-hf"
  export.export(workdir, str(repo))
  config = json.load(open(repo / "config.json"))
  config.update(transformers_version="4.39.0", _name_or_path="LongSafari/hyenadna-tiny-seqlen-hf")
  (repo / "config.json").write_text(json.dumps(config))
  result = subprocess.run(
      [sys.executable, "-m", "hyena_jax.convert", f"--model={repo}", f"--output={tmp_path / 'run'}"],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  restored, run_config, step = checkpoint.restore_model(str(tmp_path / "run"))
  assert step == 0 and checkpoint.model_config(run_config) == TINY
  _assert_trees_equal(_params(restored), _params(model))


def test_convert_original_release_directory(tmp_path):
  """An original repository: config.json as released (training fields, checkpoint_mixer, no
  shift) beside a Lightning weights.ckpt with `.mixer.layer.` keys; the shift comes from --shift."""
  small = json.load(open(shared_path("parity", "small_ckpt_shift0", "config.json")))
  repo = tmp_path / "hyenadna-small-seqlen"
  repo.mkdir()
  shutil.copy(shared_path("parity", "small_ckpt_shift0", "weights.ckpt"), repo / "weights.ckpt")
  layer = {k: v for k, v in small["layer"].items() if k != "shift"}
  (repo / "config.json").write_text(json.dumps({
      **{k: v for k, v in small.items() if k != "layer"}, "resid_dropout": 0.0,
      "embed_dropout": 0.1, "fused_mlp": False, "fused_dropout_add_ln": True,
      "return_hidden_state": True, "checkpoint_mixer": True, "checkpoint_mlp": True,
      "layer": {**layer, "_name_": "hyena", "local_order": 3, "lr": 6e-4, "wd": 0.0,
                "lr_pos_emb": 0.0}}))
  _, run_config = convert.convert(repo, str(tmp_path / "run"), shift=0.0)
  restored, _, _ = checkpoint.restore_model(str(tmp_path / "run"))
  loaded = hyena_jax.load(shared_path("parity", "small_ckpt_shift0", "weights.ckpt"))
  expected, cfg = loaded.model, loaded.config
  assert loaded.kind == "lightning" and checkpoint.model_config(run_config) == cfg
  assert cfg.shift == 0.0 and "head" not in run_config
  _assert_trees_equal(_params(restored), _params(expected))


# ------------------------------------------------------------------------------------------------
# Large models and bad input


def test_large_1m_export_plan_is_linear_and_lazy():
  """The 1M config's state dict, planned from abstract parameters (nothing allocated)."""
  cfg = config_lib.released("large-1m")
  abstract = nnx.eval_shape(lambda: HyenaLM(cfg, rngs=nnx.Rngs(0)))
  params = checkpoint.abstract_params(abstract)
  tensors = weights.state_dict_from_params(params, cfg, layout="hf")
  assert len(tensors) == 1 + 26 * cfg.n_layer + 2 + 1
  shapes = {t.key: t.shape for t in tensors}
  prefix = "hyena.backbone.layers.7.mixer."
  assert shapes[prefix + "filter_fn.pos_emb.z"] == (1, 1_000_002, 5)
  assert shapes[prefix + "in_proj.weight"] == (768, 256)
  assert shapes[prefix + "short_filter.weight"] == (768, 1, 3)
  n_floats = sum(int(np.prod(s)) for s in shapes.values())
  # Unique params (SPEC 0) + the tied lm_head copy + per-layer buffers z, t, deltas.
  assert n_floats == 6_550_528 + 16 * 256 + cfg.n_layer * (1_000_002 * 6 + 256)
  # All layers share one producer per buffer kind: built once, written n_layer times.
  assert len({id(t.make) for t in tensors if t.key.endswith("pos_emb.z")}) == 1


def test_export_bad_inputs(trained_run, tmp_path):
  workdir, model, _, _ = trained_run
  with pytest.raises(FileNotFoundError, match="no such file or folder"):
    export.export(str(tmp_path / "empty"), str(tmp_path / "a"))
  with pytest.raises(FileNotFoundError, match=r"step 7 .*available: \[0, 3\]"):
    export.export(workdir, str(tmp_path / "a"), step=7)
  with pytest.raises(ValueError, match="layout must be one of"):
    export.export(workdir, str(tmp_path / "a"), layout="onnx")
  odd = str(tmp_path / "odd")
  checkpoint.save_model(odd, model, {"model": {**TINY.to_dict(), "rope_theta": 1.0}})
  with pytest.raises(ValueError, match="rope_theta"):
    export.export(odd, str(tmp_path / "a"))
  (tmp_path / "taken").mkdir()
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export(workdir, str(tmp_path / "taken"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["odd", "taken"]  # nothing written


@pytest.mark.parametrize("num_inner_mlps", [1, 3])
def test_num_inner_mlps_round_trips_through_the_torch_reference(tmp_path, num_inner_mlps):
  """Issue 11: the freq aliases are implicit_filter.{2j+1} for j = 0..num_inner_mlps, exactly as
  PyTorch's state_dict lists them; export used to add .3/.5 always (strict load of
  num_inner_mlps=1 failed) and convert refused .7 (num_inner_mlps=3)."""
  cfg = TINY.replace(num_inner_mlps=num_inner_mlps, n_layer=1)
  model = HyenaLM(cfg, rngs=nnx.Rngs(num_inner_mlps))
  model.eval()
  workdir = str(tmp_path / "run")
  checkpoint.save_model(workdir, model, {"model": cfg.to_dict()})
  out = export.export(workdir, str(tmp_path / "pt"), layout="standalone")
  state = torch.load(os.path.join(out, "weights.pt"), weights_only=True)
  reference = torch_reference.from_pretrained(out)
  official_keys = {k[len("hyena."):] for k in reference.state_dict() if k.startswith("hyena.")}
  assert set(state) == official_keys  # what the official load_state_dict(strict=True) needs
  freqs = sorted(k.rsplit(".", 2)[-2] for k in state if k.endswith(".freq"))
  assert freqs == sorted(str(2 * j + 1) for j in range(num_inner_mlps + 1))
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, cfg.l_max), 0, 16))
  np.testing.assert_allclose(_torch_out(reference, tokens), np.asarray(model(jnp.asarray(tokens))),
                             rtol=1e-4, atol=1e-5)
  back = str(tmp_path / "back")
  convert.convert(out, back)  # the official file, aliases included, converts back exactly
  restored, run_config, _ = checkpoint.restore_model(back)
  assert checkpoint.model_config(run_config).num_inner_mlps == num_inner_mlps
  _assert_trees_equal(_params(restored), _params(model))


def test_hf_export_refuses_what_the_remote_code_hard_codes(tmp_path):
  with pytest.raises(InputError, match=r"layer_norm_epsilon=1e-06: the -hf remote code "
                                       r"hard-codes 1e-05"):
    export.check_exportable(TINY.replace(layer_norm_epsilon=1e-6), "hf")
  export.check_exportable(TINY.replace(layer_norm_epsilon=1e-6), "lightning")


def test_export_overwrite_replaces_only_its_own_files(trained_run, tmp_path):
  workdir, model, _, tokens = trained_run
  out = tmp_path / "exports"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  (out / "weights.pt").write_bytes(b"an older standalone export")
  with pytest.raises(FileExistsError, match="--overwrite"):
    export.export(workdir, str(out))
  export.export(workdir, str(out), overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "notes.txt"]
  assert (out / "notes.txt").read_text() == "mine"  # never written, never touched
  reference = torch_reference.from_pretrained(str(out))
  np.testing.assert_allclose(_torch_out(reference, tokens), np.asarray(model(jnp.asarray(tokens))),
                             rtol=1e-4, atol=1e-5)


def test_export_leaves_nothing_behind_on_failure(trained_run, tmp_path, monkeypatch):
  workdir, _, _, _ = trained_run

  def broken(path, tensors, metadata=None):
    with open(path, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(formats, "write_safetensors", broken)
  with pytest.raises(OSError, match="disk full"):
    export.export(workdir, str(tmp_path / "out"))
  assert list(tmp_path.iterdir()) == []


def test_convert_bad_inputs(tmp_path):
  good = formats.read_state_dict(shared_path("parity", "tiny1k_classifier", "weights.pt"))

  def write(name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path

  def tensors(sd):
    return {k: torch.from_numpy(v) for k, v in sd.items()}

  cases = [
      (write("unknown.pt", tensors({**good, "backbone.layers.0.mixer.rotary.inv_freq": good[
          "backbone.ln_f.bias"]})), ValueError, "does not map"),
      (write("missing.pt", tensors({k: v for k, v in good.items() if "fc2.bias" not in k})),
       ValueError, "missing"),
      (write("shape.pt", tensors({**good, "backbone.ln_f.bias": np.zeros(7, np.float32)})),
       ValueError, "shape"),
      (write("pickle.pt", {"state_dict": tensors(good), "hparams": _Opaque()}), ValueError,
       "weights_only"),
      (tmp_path / "nothing_here", FileNotFoundError, "no such file or folder: .*nothing_here"),
  ]
  for path, error, message in cases:
    with pytest.raises(error, match=message):
      convert.convert(path, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists(), path  # validated before anything is written
  with pytest.raises(ValueError, match="pooling"):
    convert.convert(shared_path("parity", "tiny1k_classifier"), str(tmp_path / "run"),
                    pooling="max")
  # A config.json whose d_model disagrees with the weights names d_model (not l_max).
  wrong = tmp_path / "wrong_d_model"
  wrong.mkdir()
  shutil.copy(shared_path("parity", "tiny1k_classifier", "weights.pt"), wrong)
  config = json.loads(shared_path("parity", "tiny1k_classifier", "config.json").read_text())
  (wrong / "config.json").write_text(json.dumps({**config, "d_model": 256, "d_inner": 1024}))
  with pytest.raises(InputError, match=r"expected \(1, 1, 256\) for d_model=256; the config's "
                                       r"d_model does not match the checkpoint \(128 there\)"):
    convert.convert(wrong, str(tmp_path / "run"))
  # Into a folder that holds checkpoints already (any step): refused, nothing added.
  source = shared_path("parity", "tiny1k_classifier")
  convert.convert(source, str(tmp_path / "run"), step=10)
  for step in (0, 10, 20):
    with pytest.raises(OutputExistsError, match=r"already holds checkpoints \(latest step 10\)"):
      convert.convert(source, str(tmp_path / "run"), step=step)
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10"]


class _Opaque:
  """A pickled class object that weights_only loading refuses."""
