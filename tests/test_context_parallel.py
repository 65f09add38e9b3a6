"""Context parallelism on 8 fake CPU devices: sharded == unsharded; the HLO is what we intend."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyena_jax.model import fftconv
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM
from hyena_jax.training import context_parallel as cp
from hyena_jax.training import sharding

# d_inner, filter_order, emb_dim and V (16) avoid the lengths below, so a collective whose shape
# holds a full (padded) length is an activation, never a parameter.
CFG = HyenaConfig(d_model=16, n_layer=2, d_inner=64, filter_order=8, l_max=64)
FWD_LEN = 45     # not divisible by 8 (pads to 48) nor by 2 (pads to 46)
TRAIN_LEN = 38   # not divisible by 4 (pads to 40)


def _mesh(data=1, fsdp=1, sequence=1):
  return sharding.make_mesh(data, fsdp, sequence, devices=jax.devices()[:data * fsdp * sequence])


def _collectives(compiled):
  return cp.collectives(compiled.as_text())


def _assert_no_full_length(collectives, lengths):
  """No collective except the all-to-alls carries a float array with a full-length axis.

  Integer token ids ([B, L] int32, 1/d_model of an activation) may be resharded: with a length
  the mesh does not divide they cannot arrive sharded, and the embedding gradient's scatter-add
  regroups them.
  """
  for op, shapes in collectives:
    if op != "all-to-all":
      for dtype, shape in shapes:
        assert dtype.startswith("s") or not set(shape) & set(lengths), (
            f"{op} of a full-length array {dtype}{list(shape)}")


@pytest.fixture(scope="module")
def model():
  return HyenaLM(CFG, rngs=nnx.Rngs(0))


def _forward_pair(impl):
  """(unsharded, context-parallel on 8 sequence shards) logits and hidden states, conv_impl=impl."""
  model = HyenaLM(CFG.replace(conv_impl=impl), rngs=nnx.Rngs(0))
  model.eval()
  ids = jax.random.randint(jax.random.key(1), (4, FWD_LEN), 0, CFG.vocab_size)
  graphdef, state = nnx.split(model)
  mesh = _mesh(sequence=8)

  def ref(s, t):
    m = nnx.merge(graphdef, s)
    return (m(t),)

  def sharded(s, t):
    m = nnx.merge(graphdef, s)
    return (cp.forward(m, t, mesh),)

  got = jax.jit(sharded)(state, ids)
  return graphdef, state, ids, jax.jit(ref)(state, ids), got


def _assert_forward_equal(want, got):
  for w, g in zip(want, got):
    assert g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def fwd_case():
  graphdef, state, ids, want, got = _forward_pair("fft")
  return graphdef, state, ids, np.asarray(want[0]), got, want


def test_forward_matches_unsharded_on_8_sequence_shards(fwd_case):
  *_, got, want = fwd_case
  _assert_forward_equal(want, got)


def test_forward_with_fsdp_sharded_params_on_data_fsdp_sequence_mesh(fwd_case):
  graphdef, state, ids, want, *_ = fwd_case
  mesh = _mesh(data=2, fsdp=2, sequence=2)
  # Shard every parameter whose first axis is even over fsdp (the project's rule would leave
  # these tiny ones replicated), so the step has to gather parameters on the way in.
  def fsdp(x):
    return NamedSharding(mesh, P("fsdp") if x.shape and x.shape[0] % 2 == 0 else P())
  state = jax.device_put(state, jax.tree.map(fsdp, state))
  ids = jax.device_put(ids, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  f = jax.jit(lambda s, t: cp.forward(nnx.merge(graphdef, s), t, mesh, unpad=False))
  compiled = f.lower(state, ids).compile()
  got = compiled(state, ids)
  assert got.shape == (4, 46, CFG.padded_vocab_size)
  assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(sharding.BATCH_AXES, "sequence")), 3)
  np.testing.assert_allclose(np.asarray(got)[:, :FWD_LEN], want, rtol=1e-4, atol=1e-4)
  ops = _collectives(compiled)
  assert any(op == "all-gather" for op, _ in ops), "fsdp-sharded parameters were never gathered"
  _assert_no_full_length(ops, (FWD_LEN, 46))


def _train_pair(impl):
  """Loss and gradients (embedding dropout on, some positions weighted 0), both ways: unsharded
  and context-parallel on a data=2 x sequence=4 mesh, with conv_impl=impl."""
  model = HyenaLM(CFG.replace(conv_impl=impl), rngs=nnx.Rngs(0))
  model.train()
  graphdef, params = nnx.split(model)
  ids = jax.random.randint(jax.random.key(2), (4, TRAIN_LEN), 0, CFG.vocab_size)
  targets = jnp.roll(ids, -1, axis=1)
  w = (jax.random.uniform(jax.random.key(3), ids.shape) > 0.25).astype(jnp.float32)
  key = jax.random.key(4)

  def ref_loss(p, ids, targets, w, key):
    logits = nnx.merge(graphdef, p)(ids, dropout_key=key)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return (ce * w).sum() / w.sum()

  mesh = _mesh(data=2, sequence=4)

  def cp_loss(p, ids, targets, w, key):
    return cp.lm_loss(nnx.merge(graphdef, p), ids, targets, mesh, weights=w, dropout_key=key,
                      batch_axes=("data",))

  args = (params, ids, targets, w, key)
  compiled = jax.jit(jax.value_and_grad(cp_loss, has_aux=True)).lower(*args).compile()
  want = jax.jit(jax.value_and_grad(ref_loss))(*args)
  return want, compiled(*args), compiled, w


def _assert_train_equal(want, got, w):
  (want_loss, want_grads), ((loss, metrics), grads) = want, got
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert float(metrics["tokens"]) == float(w.sum())
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0
  flat_want, flat = jax.tree.leaves(want_grads), jax.tree.leaves(grads)
  assert len(flat) == len(flat_want)
  for g, g0 in zip(flat, flat_want):
    scale = float(jnp.abs(g0).max())
    assert scale > 0.0
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def train_case():
  return _train_pair("fft")


def test_train_step_matches_unsharded_on_data_x_sequence_mesh(train_case):
  want, got, _, w = train_case
  _assert_train_equal(want, got, w)


def test_pallas_conv_impl_matches_unsharded_forward_and_train_step():
  """conv_impl='pallas' (interpret mode on CPU) through context parallelism: the kernel runs on
  each device's full-length channels after the all-to-all; same equalities as with fft."""
  *_, want, got = _forward_pair("pallas")
  _assert_forward_equal(want, got)
  want, got, _, w = _train_pair("pallas")
  _assert_train_equal(want, got, w)


def test_train_step_hlo_has_all_to_alls_and_no_full_length_gathers(train_case):
  *_, compiled, _ = train_case
  ops = _collectives(compiled)
  a2a = [shapes for op, shapes in ops if op == "all-to-all"]
  # Forward: v*x1, the filter and the result per layer; the backward transposes them.
  assert len(a2a) >= 3 * CFG.n_layer * 2
  for shapes in a2a:  # each peer's piece is 1/N of one device's slice: never a full length
    assert all(max(shape) < TRAIN_LEN for _, shape in shapes), shapes
  assert any(op == "collective-permute" for op, _ in ops), "no halo exchange for the short filter"
  # 41 = rfft bins of the padded length: a filter spectrum must not be reduced across devices.
  _assert_no_full_length(ops, (TRAIN_LEN, 40, fftconv.fft_size(2 * 40 - 1) // 2 + 1))


def test_all_to_alls_exchange_whole_blocks_along_a_major_axis(model):
  """Every all-to-all of the train step (forward and backward) splits and concatenates one
  non-minor axis of size N. One that cuts the minor (length) axis is emitted by libtpu as code
  that grows with the length: the 8-way 1-layer large-1m step took 7.6 KB of compile-host memory
  per token, a 4M-token compile over 30 GB (issue 24)."""
  graphdef, params = nnx.split(model)
  ids = jnp.zeros((2, TRAIN_LEN), jnp.int32)
  mesh = _mesh(data=2, sequence=4)

  def loss(p, ids):
    return cp.lm_loss(nnx.merge(graphdef, p), ids, ids, mesh, batch_axes=("data",),
                      dropout_key=jax.random.key(0))[0]

  text = jax.jit(jax.grad(loss)).lower(params, ids).as_text()
  found = re.findall(r'"stablehlo.all_to_all".*?concat_dimension = (\d+).*?split_count = (\d+)'
                     r'.*?split_dimension = (\d+).*?: \(tensor<([0-9x]+)x', text)
  assert len(found) >= 3 * CFG.n_layer * 2, found  # v*x1, filter, result; and their transposes
  for concat, count, split, dims in found:
    rank = len(dims.split("x"))
    assert (concat, count) == (split, "4") and int(split) < rank - 2, (concat, split, dims)


def test_memory_report_shrinks_with_sequence_shards():
  small = CFG.replace(n_layer=1)
  one = cp.plan_memory(small, seq_len=2048, batch=1, sequence=1, train=False)
  eight = cp.plan_memory(small, seq_len=2048, batch=1, sequence=8, train=False)
  assert one["temp_bytes"] > 2048 * small.d_model * 4  # at least one [L, d] float32 activation
  assert eight["peak_bytes"] < one["peak_bytes"] / 4


def test_bad_layouts_raise_clear_errors(model):
  model.eval()
  ids = jnp.zeros((2, 16), jnp.int32)
  with pytest.raises(ValueError, match="divisible by the sequence axis size 3"):
    cp.forward(model, ids, _mesh(sequence=3))
  with pytest.raises(ValueError, match="batch 2 is not divisible by 4"):
    cp.forward(model, ids, _mesh(data=4, sequence=2))
  with pytest.raises(ValueError, match="no sequence axis 'seq'"):
    cp.forward(model, ids, _mesh(sequence=2), seq_axis="seq")
  with pytest.raises(ValueError, match="exceeds l_max"):
    cp.forward(model, jnp.zeros((2, CFG.l_max + 1), jnp.int32), _mesh(sequence=2))
