"""`conv_impl` (and the Pallas kernel's `pallas_spectra_dtype`) is honoured on every path: the
model, context parallelism and cached decoding.

Both implementations are replaced by call-counting fakes (the pallas fake computes with the FFT,
so nothing here runs the slow Pallas interpreter); each path is traced once per conv_impl and
must call the chosen implementation once per layer, with the chosen spectra dtype, and the other
one never. The numerical
equalities with the real kernel (interpret mode) are in test_context_parallel.py,
test_inference.py and test_pallas_conv.py.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyena_jax.errors import InputError
from hyena_jax.inference import generate
from hyena_jax.model import fftconv
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM
from hyena_jax.model.kernels import pallas_conv
from hyena_jax.training import context_parallel as cp
from hyena_jax.training import sharding

# An l_max used by no other test file: jit caches key on the config, so every path here is
# traced afresh (a cache hit would skip the Python calls being counted).
CFG = HyenaConfig(d_model=8, n_layer=2, d_inner=16, filter_order=8, l_max=40)
# "pallas-bf16": conv_impl="pallas" with pallas_spectra_dtype="bfloat16".
IMPLS = ("fft", "pallas", "pallas-bf16")


@pytest.fixture
def calls(monkeypatch):
  """Counts calls per implementation; both compute with the real FFT path."""
  counts = collections.Counter()
  real_fft = fftconv.fft_long_conv

  def fake_fft(u, k, d_bias, gate=None, **kwargs):
    assert not kwargs, f"the dispatch passed {kwargs} to the fft path"
    counts["fft"] += 1
    return real_fft(u, k, d_bias, gate)

  def fake_pallas(u, k, d_bias, gate=None, *, spectra_dtype):
    counts[{"float32": "pallas", "bfloat16": "pallas-bf16"}[spectra_dtype]] += 1
    return real_fft(u, k, d_bias, gate)

  monkeypatch.setattr(fftconv, "fft_long_conv", fake_fft)
  monkeypatch.setattr(pallas_conv, "long_conv", fake_pallas)
  return counts


def _model(impl, train=False):
  spectra = "bfloat16" if impl == "pallas-bf16" else "float32"
  model = HyenaLM(CFG.replace(conv_impl=impl.removesuffix("-bf16"), pallas_spectra_dtype=spectra),
                  rngs=nnx.Rngs(0))
  model.train() if train else model.eval()
  return model


def _trace(fn, model, ids):
  """Traces fn(model, ids) (jax.eval_shape: no compilation, no run)."""
  graphdef, state = nnx.split(model)
  jax.eval_shape(lambda s, x: fn(nnx.merge(graphdef, s), x), state, ids)


def _expect(calls, impl, n):
  assert calls == {impl: n}, f"conv_impl={impl!r}: the long convolutions called were {calls}"


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_uses_conv_impl(calls, impl):
  ids = jnp.zeros((2, 24), jnp.int32)
  _trace(lambda m, x: m(x), _model(impl), ids)
  _expect(calls, impl, CFG.n_layer)


@pytest.mark.parametrize("impl", IMPLS)
def test_context_parallel_forward_and_train_step_use_conv_impl(calls, impl):
  mesh = sharding.make_mesh(1, 1, 8, devices=jax.devices()[:8])
  ids = jnp.zeros((2, 24), jnp.int32)
  _trace(lambda m, x: cp.forward(m, x, mesh), _model(impl), ids)
  _expect(calls, impl, CFG.n_layer)
  calls.clear()
  loss = lambda m, x: cp.lm_loss(m, x, x, mesh, dropout_key=jax.random.key(0))[0]  # noqa: E731
  _trace(nnx.grad(loss), _model(impl, train=True), ids)
  _expect(calls, impl, CFG.n_layer)


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_generation_uses_conv_impl_in_prefill(calls, impl):
  model = _model(impl)
  result = generate.generate(model, "ACGTA", 6, method="cached", seed=0)
  # Prefill: one long convolution per layer. The steps are dot products (long_conv_step).
  _expect(calls, impl, CFG.n_layer)
  calls.clear()
  again = generate.generate(model, "ACGTA", 6, method="recompute", seed=0)
  _expect(calls, impl, CFG.n_layer)
  assert result.sequences == again.sequences


def test_unknown_conv_impl_is_refused_with_the_choices():
  with pytest.raises(InputError, match=r"conv_impl must be one of \('fft', 'pallas'\)"):
    HyenaConfig(conv_impl="direct")
  u = jnp.zeros((1, 2, 4))
  with pytest.raises(InputError, match="conv_impl must be one of"):
    fftconv.long_conv(u, u[0], jnp.zeros(2), impl="direct")
  with pytest.raises(InputError, match=r"pallas_spectra_dtype must be one of \('float32', "
                     r"'bfloat16'\)"):
    HyenaConfig(conv_impl="pallas", pallas_spectra_dtype="float16")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fft_conv_in_sequential_channel_groups_equals_one_call(monkeypatch, dtype):
  """GPU/TPU run a long sequence's FFTs over channel groups one after another (lax.map) to bound
  the spectra's memory, keeping u (in its dtype) instead of spectra for the backward; forced
  here on the CPU with a tiny group budget, output and gradients equal the single call's."""
  from hyena_jax.model import fftconv
  u = jax.random.normal(jax.random.key(0), (2, 8, 100)).astype(dtype)
  k = jax.random.normal(jax.random.key(1), (8, 100)) / 10
  d_bias = jax.random.normal(jax.random.key(2), (8,))
  gate = jax.random.normal(jax.random.key(3), (2, 8, 100))

  def run():
    loss = lambda u, k: jnp.sum(fftconv.fft_long_conv(u, k, d_bias, gate) ** 2)  # noqa: E731
    return fftconv.fft_long_conv(u, k, d_bias, gate), jax.grad(loss, argnums=(0, 1))(u, k)

  monkeypatch.setattr(fftconv, "_cpu_parts", lambda channels: 1)
  whole = jax.jit(run)()
  spectrum = fftconv._spectrum_bytes(2, fftconv.fft_size(199))
  monkeypatch.setattr(fftconv, "_GROUP_BYTES", 2 * spectrum)     # 2 channels per group
  assert fftconv._accelerator_groups(8, spectrum) == 4
  grouped_run = jax.jit(lambda: run())  # a new function: not the cached trace of `whole`
  assert "while" in grouped_run.lower().as_text()                  # the groups run as a loop
  grouped = grouped_run()
  for a, b in zip(jax.tree.leaves(grouped), jax.tree.leaves(whole)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6,
                               atol=1e-6)
