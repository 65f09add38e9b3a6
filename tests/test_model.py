"""The model against the official PyTorch outputs, the convolution maths, and its boundaries."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

import hyena_jax
from conftest import shared_path
from hyena_jax.interop import weights
from hyena_jax.model import config as config_lib
from hyena_jax.model import fftconv
from hyena_jax.model import hyenadna
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM, SequenceClassifier

TINY = HyenaConfig(d_model=16, n_layer=2, d_inner=64, filter_order=8, l_max=96)

FIXTURES = [("tiny_1k", "weights.safetensors", "hf"),
            ("small_ckpt_shift0", "weights.ckpt", "lightning"),
            ("tiny1k_classifier", "weights.pt", "standalone")]


@pytest.mark.parametrize("name,filename,layout", FIXTURES)
def test_parity_with_official_model(name, filename, layout):
  folder = shared_path("parity", name)
  loaded = hyena_jax.load(folder / filename)
  model, cfg = loaded.model, loaded.config
  assert loaded.kind == layout
  tokens = jnp.asarray(np.load(folder / "tokens.npy"))
  out = model.backbone(tokens, return_layers=True)
  np.testing.assert_allclose(out.hidden, np.load(folder / "hidden.npy"), rtol=1e-4, atol=1e-4)
  if name == "tiny1k_classifier":
    assert isinstance(model, SequenceClassifier) and model.pooling == "mean"
    np.testing.assert_allclose(model(tokens), np.load(folder / "class_logits.npy"),
                               rtol=1e-4, atol=1e-4)
    return
  expected_layers = np.load(folder / "layers.npy")            # [n_layer, batch, L, d]
  assert expected_layers.shape[0] == cfg.n_layer == len(out.layers)
  np.testing.assert_allclose(np.stack(out.layers), expected_layers, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(model(tokens), np.load(folder / "logits.npy"), rtol=1e-4, atol=1e-4)
  # shift is not in official -hf configs; the fixture with shift 0.0 records it explicitly.
  assert cfg.shift == json.loads((folder / "config.json").read_text())["layer"].get("shift", 0.05)


def _direct_numpy_conv(u, k, d_bias):
  batch, channels, length = u.shape
  y = np.zeros_like(u, dtype=np.float64)
  for b in range(batch):
    for c in range(channels):
      y[b, c] = np.convolve(u[b, c], k[c])[:length] + d_bias[c] * u[b, c]
  return y


@pytest.mark.parametrize("length", [1, 7, 301, 2049])
def test_fft_conv_equals_direct_convolution(length):
  rng = np.random.default_rng(length)
  u = rng.standard_normal((2, 3, length)).astype(np.float32)
  k = rng.standard_normal((3, length)).astype(np.float32) / np.sqrt(length)
  d_bias = rng.standard_normal(3).astype(np.float32)
  gate = rng.standard_normal((2, 3, length)).astype(np.float32)
  expected = _direct_numpy_conv(u, k, d_bias)
  np.testing.assert_allclose(fftconv.fft_long_conv(u, k, d_bias), expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(fftconv.fft_long_conv(u, k, d_bias, gate), expected * gate,
                             rtol=1e-4, atol=1e-4)
  if length <= 301:
    np.testing.assert_allclose(fftconv.direct_long_conv(u, k, d_bias), expected, rtol=1e-4,
                               atol=1e-4)
    # Cached decoding's one-position form, on the inputs up to t (later ones still zero).
    k_rev = fftconv.decoding_filter(jnp.asarray(k))
    for t in {0, length // 2, length - 1}:
      seen = np.where(np.arange(length) <= t, u, 0.0)
      np.testing.assert_allclose(fftconv.long_conv_step(seen, k_rev, d_bias, t), expected[..., t],
                                 rtol=1e-5, atol=1e-5)


def test_fft_size_is_smooth_and_large_enough():
  for n in [1, 2, 3, 17, 2051, 2 * 1_000_002 - 1]:
    size = fftconv.fft_size(n)
    assert size >= n
    rest = size
    for p in (2, 3, 5):
      while rest % p == 0:
        rest //= p
    assert rest == 1
  assert fftconv.fft_size(2 * 1_000_002 - 1) < 2 * 1_000_002 * 1.05


def test_causality_and_long_range_reach():
  model = HyenaLM(TINY, rngs=nnx.Rngs(0))
  model.eval()
  length, t = 64, 50
  x = jax.random.normal(jax.random.key(1), (1, length, TINY.d_model))

  def sensitivity(fn):  # |d out[t] / d x[s]| summed over channels, for every s: [length]
    return jnp.abs(jax.grad(lambda emb: fn(emb)[0, t].sum())(x)[0]).sum(-1)

  whole = sensitivity(lambda emb: model.backbone(None, embeddings=emb).hidden)
  # Exactly zero up to FFT round-off (~1e-20 here), far below any real dependence.
  assert float(whole[t + 1:].max()) < 1e-9 * float(whole.max()), "output depends on the future"
  assert float(whole[: t - 10].min()) > 0.0
  # Reach, on one operator (the residual path would dwarf it at random init): positions well
  # beyond the 3-tap short filter still matter, through the long convolution alone.
  mixer = sensitivity(model.backbone.layers[0].mixer)
  assert float(mixer[t + 1:].max()) < 1e-9 * float(mixer.max())
  assert float(mixer[: t - 10].min()) > 1e-4 * float(mixer.max()), mixer


def test_parameter_counts_of_released_models_without_allocation():
  expected = {"tiny-1k": 436_096, "tiny-1k-d256": 1_641_088, "tiny-16k-d128": 436_096,
              "small-32k": 3_277_568, "medium-160k": 6_550_528, "medium-450k": 6_550_528,
              "large-1m": 6_550_528}
  for name, count in expected.items():
    cfg = config_lib.released(name)
    abstract = nnx.eval_shape(lambda: HyenaLM(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == count, name


def test_large_1m_forward_shapes_at_full_context():
  cfg = config_lib.released("large-1m")
  abstract = nnx.eval_shape(lambda: HyenaLM(cfg, rngs=nnx.Rngs(0)))
  abstract.eval()
  graphdef, state = nnx.split(abstract)
  ids = jax.ShapeDtypeStruct((1, cfg.l_max), jnp.int32)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, ids)
  assert out.shape == (1, 1_000_002, 16) and out.dtype == jnp.float32


def test_bfloat16_policy_keeps_float32_where_it_matters():
  model32 = HyenaLM(TINY, rngs=nnx.Rngs(0))
  model16 = HyenaLM(TINY.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  for m in (model32, model16):
    m.eval()
  ids = jax.random.randint(jax.random.key(0), (2, 80), 7, 12)
  logits32, logits16 = model32(ids), model16(ids)
  assert logits16.dtype == jnp.float32
  assert nnx.state(model16, nnx.Param)["backbone"]["ln_f"]["scale"][...].dtype == jnp.float32
  rel = float(jnp.linalg.norm(logits16 - logits32) / jnp.linalg.norm(logits32))
  assert 0 < rel < 3e-2


def _dot_precisions(fn, *args):
  """The `precision` of every dot_general in fn's jaxpr, nested jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for sub in jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_filter_mlp_and_lm_head_matmuls_run_at_highest_precision():
  """On TPU the default float32 matmul is one bfloat16 pass (TF32 on A100/H100): the implicit
  filter (sin(w Wz) and the last Linear) and the tied LM head must ask for HIGHEST; the
  projections keep the dtype policy (default precision)."""
  model = HyenaLM(TINY, rngs=nnx.Rngs(0))
  mixer = model.backbone.layers[0].mixer
  highest = jax.lax.Precision.HIGHEST
  filter_dots = _dot_precisions(lambda: mixer.filter_fn(32))
  assert len(filter_dots) == TINY.num_inner_mlps + 2
  assert all(p == (highest, highest) for p in filter_dots), filter_dots
  head = _dot_precisions(model.logits_from_hidden, jnp.ones((2, 3, TINY.d_model)))
  assert head == [(highest, highest)]
  # in_proj: one matmul per third of its kernel (x0, x1, v), all at the default precision.
  proj = _dot_precisions(lambda u: mixer.project(u)[:3], jnp.ones((2, 3, TINY.d_model)))
  assert proj == [None] * 3


@pytest.mark.parametrize("remat", ["block", "offload", "offload_in_slices"])
def test_scanned_layers_equal_the_unrolled_stack(remat, monkeypatch):
  """Also with the block inputs offloaded to host memory (remat='offload'), and offloaded in
  channel slices, as sequences past 1M tokens are (libtpu cannot offload > 1 GiB at once)."""
  ids = jax.random.randint(jax.random.key(0), (2, 50), 7, 12)
  if remat == "offload_in_slices":
    remat = "offload"
    monkeypatch.setattr(hyenadna, "_OFFLOAD_PIECE_BYTES", 50 * TINY.d_model)  # a quarter
    names = []
    def walk(jaxpr):
      for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name" and eqn.params["name"] == "block_input":
          names.append(eqn.invars[0].aval.shape)
        for sub in jaxprs_in_params(eqn.params):
          walk(sub)
    x = jnp.ones((2, 50, TINY.d_model))
    walk(jax.make_jaxpr(hyenadna._named_block_input)(x).jaxpr)
    assert len(names) == 4 and sum(shape[2] for shape in names) == TINY.d_model, names
  unrolled = HyenaLM(TINY.replace(n_layer=3), rngs=nnx.Rngs(0))
  scanned = HyenaLM(TINY.replace(n_layer=3, scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
  key = jax.random.key(3)  # training mode: dropout masks must match too
  out_u = unrolled.backbone(ids, return_layers=True, dropout_key=key)
  out_s = scanned.backbone(ids, return_layers=True, dropout_key=key)
  assert len(out_s.layers) == 3
  np.testing.assert_allclose(np.stack(out_s.layers), np.stack(out_u.layers), rtol=1e-5, atol=1e-6)
  grad_u = nnx.state(jax.grad(lambda m: m(ids, dropout_key=key).sum())(unrolled))
  grad_s = nnx.state(jax.grad(lambda m: m(ids, dropout_key=key).sum())(scanned))
  for a, b in zip(jax.tree.leaves(grad_s), jax.tree.leaves(grad_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_classifier_pooling_modes():
  model = SequenceClassifier(TINY, 3, pooling="last", rngs=nnx.Rngs(0))
  model.eval()
  ids = jax.random.randint(jax.random.key(0), (2, 20), 7, 12)
  hidden = model.backbone(ids).hidden
  np.testing.assert_allclose(model(ids), model.output_transform(hidden[:, -1]), rtol=1e-6)
  with pytest.raises(ValueError, match="pooling"):
    SequenceClassifier(TINY, 3, pooling="max", rngs=nnx.Rngs(0))


def test_bad_inputs_raise_clear_errors():
  model = HyenaLM(TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="exceeds l_max=96"):
    model(jnp.full((1, 97), 7))
  with pytest.raises(ValueError, match=r"\[0, 16\)"):
    model(jnp.array([[7, 16]]))
  with pytest.raises(ValueError, match=r"\[0, 16\)"):
    model(jnp.array([[-1, 7]]))
  with pytest.raises(TypeError, match="integers"):
    model(jnp.ones((1, 4), jnp.float32))
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model(jnp.ones((4,), jnp.int32))


def test_config_validation():
  with pytest.raises(ValueError, match="unknown HyenaConfig field"):
    config_lib.from_dict({"d_modle": 128})
  with pytest.raises(ValueError, match="hyena_order"):
    HyenaConfig(hyena_order=3)
  with pytest.raises(ValueError, match="d_model must be a positive int"):
    HyenaConfig(d_model=0)
  with pytest.raises(ValueError, match="does not understand"):
    config_lib.from_official({"d_model": 8, "layer": {"l_max": 10, "fancy": 1}})
  cfg = config_lib.from_official({"d_model": 256, "n_layer": 8, "d_inner": 1024,
                                  "max_seq_len": 1_000_002, "activation_freq": 10,
                                  "model_type": "hyenadna"})
  assert cfg == config_lib.released("large-1m")


def test_importer_refuses_unknown_missing_and_misshapen_keys():
  model = HyenaLM(TINY, rngs=nnx.Rngs(0))
  canonical = {e.torch_key: e.to_torch(np.asarray(nnx.to_pure_dict(nnx.state(model, nnx.Param))
                                                  ["backbone"]["word_embeddings"]["embedding"]))
               for e in weights.key_map(TINY)[:1]}
  with pytest.raises(ValueError, match="required key"):
    weights.load_into(model, TINY, canonical)
  full = {}
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for e in weights.key_map(TINY):
    value = pure
    for part in e.path:
      value = value[part]
    full[e.torch_key] = e.to_torch(np.asarray(value))
  weights.load_into(model, TINY, full)  # round trip of our own parameters works
  with pytest.raises(ValueError, match="does not map"):
    weights.load_into(model, TINY, {**full, "backbone.layers.0.mixer.extra": np.zeros(1)})
  bad = dict(full)
  bad["backbone.layers.0.mlp.fc1.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match="has shape"):
    weights.load_into(model, TINY, bad)
  wrong_z = dict(full)
  wrong_z.update(weights.buffers(TINY))
  wrong_z["backbone.layers.0.mixer.filter_fn.pos_emb.z"] = wrong_z[
      "backbone.layers.0.mixer.filter_fn.pos_emb.z"] + 0.5
  with pytest.raises(ValueError, match="trained positional"):
    weights.load_into(model, TINY, wrong_z)
  with pytest.raises(ValueError, match="not a HyenaDNA checkpoint"):
    weights.canonicalize({"encoder.weight": np.zeros(1)})
