"""The Pallas long convolution (interpret mode on CPU) against the jnp.fft reference.

Tolerances, measured here and kept with ~10x headroom:
  * float32: |pallas - fft| <= 2e-5 * max|fft| for outputs and gradients (matmul DFTs and XLA's
    FFT round differently; observed 1e-7 .. 2e-6 relative at these sizes).
  * bfloat16 inputs: both paths compute in float32 and round once to bfloat16, so they differ by
    at most about one bfloat16 ulp: <= 1e-2 * max|fft|. Float32 gradients (dk, dD) use 1e-3.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import ad_checkpoint

import hyena_jax
from conftest import shared_path
from hyena_jax.model import fftconv
from hyena_jax.model.kernels import pallas_conv

F32_TOL = 2e-5
BF16_TOL = 1e-2


def _inputs(batch, channels, length, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  u = jax.random.normal(ks[0], (batch, channels, length)).astype(dtype)
  # Decaying filter, like the model's: the conv output stays O(1) at every length.
  k = jax.random.normal(ks[1], (channels, length)) * jnp.exp(-jnp.arange(length) / 50.0)
  d_bias = jax.random.normal(ks[2], (channels,))
  gate = jax.random.normal(ks[3], (batch, channels, length)).astype(dtype)
  cotangent = jax.random.normal(ks[4], (batch, channels, length)).astype(dtype)
  return u, k, d_bias, gate, cotangent


def _value_and_grads(fn, u, k, d_bias, gate, cotangent):
  """Output and the VJP of a fixed cotangent w.r.t. (u, k, d_bias, gate): one compilation."""
  def run(u, k, d_bias, gate, cotangent):
    out, vjp = jax.vjp(fn, u, k, d_bias, gate)
    return out, vjp(cotangent)
  return jax.jit(run)(u, k, d_bias, gate, cotangent)


def _assert_close(actual, expected, tol, what):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  assert actual.shape == expected.shape, what
  scale = max(float(np.abs(expected).max()), 1e-6)
  err = float(np.abs(actual - expected).max())
  assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol} * {scale:.3g}"


CASES = [
    # (length, dtype, plan options): single pass on the GPU rules, non-powers of two included.
    (5, jnp.float32, {}),
    (300, jnp.float32, {}),
    (300, jnp.bfloat16, {}),
    # Two-pass scheme (column kernels + on-chip row kernel), forced at small lengths; each keeps
    # half of the n1 column-spectrum rows (the others are conjugate mirrors): 32 of 64 at 5000.
    (1000, jnp.float32, {"max_onchip": 512}),
    (5000, jnp.float32, {"max_onchip": 256}),
    (300, jnp.bfloat16, {"max_onchip": 512}),
    # The TPU block rules (q a multiple of 128), single and two pass (9000: 16 of 32 rows kept).
    (300, jnp.float32, {"platform": "tpu"}),
    (1000, jnp.float32, {"platform": "tpu", "max_onchip": 1024}),
    (9000, jnp.float32, {"platform": "tpu", "max_onchip": 1024}),
    (1000, jnp.bfloat16, {"platform": "tpu", "max_onchip": 1024}),   # 'auto' is bf16x3 here
]


def _case_id(case):
  length, dtype, options = case
  return "-".join([f"L{length}", jnp.dtype(dtype).name] + [f"{k}{v}" for k, v in options.items()])


@pytest.mark.parametrize("length,dtype,options", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_and_gradients_match_fft(length, dtype, options):
  plan = pallas_conv.make_plan(length, options.get("platform", "gpu"), options.get("max_onchip"))
  assert (plan.n1 > 1) == ("max_onchip" in options)  # the case exercises the scheme it names
  assert plan.n1 == 1 or 2 * plan.kept == plan.n1
  args = _inputs(2, 3, length, dtype)
  out, grads = _value_and_grads(
      lambda *a: pallas_conv.long_conv(*a, interpret=True, **options), *args)
  ref_out, ref_grads = _value_and_grads(fftconv.fft_long_conv, *args)
  assert out.dtype == dtype
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  _assert_close(out, ref_out, tol, "output")
  for name, g, r in zip(("du", "dk", "dD", "dgate"), grads, ref_grads):
    assert g.dtype == r.dtype, name
    _assert_close(g, r, tol if g.dtype != jnp.float32 else max(F32_TOL, tol / 10), name)


SPLIT_CASES = [
    # (length, dtype, options, halvings): sequences whose FFT exceeds max_fft are split in halves
    # (four half-length convolutions each); odd lengths pad, the pieces run either scheme.
    (1000, jnp.float32, {"max_fft": 1024}, 1),
    (777, jnp.float32, {"max_fft": 512}, 2),
    (3000, jnp.bfloat16, {"max_fft": 4096, "max_onchip": 512}, 1),
    (3001, jnp.float32, {"platform": "tpu", "max_fft": 2048}, 2),
]


@pytest.mark.parametrize("length,dtype,options,halvings", SPLIT_CASES,
                         ids=[_case_id(c[:3]) for c in SPLIT_CASES])
def test_sequences_past_max_fft_are_split_in_halves(length, dtype, options, halvings):
  platform = options.get("platform", "gpu")
  assert pallas_conv.halvings(length, platform, options.get("max_onchip"),
                              options["max_fft"]) == halvings
  args = _inputs(2, 3, length, dtype, seed=2)
  out, grads = _value_and_grads(
      lambda *a: pallas_conv.long_conv(*a, interpret=True, **options), *args)
  ref_out, ref_grads = _value_and_grads(fftconv.fft_long_conv, *args)
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  _assert_close(out, ref_out, tol, "output")
  for name, g, r in zip(("du", "dk", "dD", "dgate"), grads, ref_grads):
    _assert_close(g, r, tol if g.dtype != jnp.float32 else max(F32_TOL, tol / 10), name)
  # Without a gate too (the pieces then take none).
  no_gate = jax.jit(lambda u, k, d: pallas_conv.long_conv(u, k, d, interpret=True, **options))
  _assert_close(no_gate(*args[:3]), jax.jit(fftconv.fft_long_conv)(*args[:3]), tol, "no gate")


@pytest.mark.parametrize("options", [{}, {"max_fft": 32}], ids=["whole", "split_in_halves"])
def test_no_gate_and_vmap(options):
  """gate=None is the plain skip-term conv, and the op (and its gradient) vmaps."""
  u, k, d_bias, _, _ = _inputs(2, 2, 37, jnp.float32, seed=1)
  stacked = jnp.stack([u, -2 * u])                                   # [2, B, C, L]

  def run(conv):
    loss = lambda u, k: jnp.sum(conv(u, k, d_bias) ** 2)  # noqa: E731
    return jax.vmap(lambda u: (conv(u, k, d_bias), jax.grad(loss, argnums=(0, 1))(u, k)))(stacked)

  out, grads = jax.jit(functools.partial(
      run, lambda *a: pallas_conv.long_conv(*a, interpret=True, **options)))()
  ref_out, ref_grads = jax.jit(functools.partial(run, fftconv.fft_long_conv))()
  _assert_close(out, ref_out, F32_TOL, "vmapped output without gate")
  for name, g, r in zip(("du", "dk"), grads, ref_grads):
    _assert_close(g, r, F32_TOL, f"vmapped {name} without gate")


def test_plans_respect_block_rules():
  for platform in ("gpu", "tpu"):
    for length in (1, 5, 256, 1000, 1024, 4097, 65_536, 1_000_000, 1 << 20):
      plan = pallas_conv.make_plan(length, platform)
      assert plan.n >= 2 * length and plan.n & (plan.n - 1) == 0
      assert plan.n == plan.n1 * plan.p * plan.q
      if platform == "gpu":      # Triton: power-of-two blocks, matmul dims >= 16
        assert min(plan.p // (2 if plan.n1 == 1 else 1), plan.q) >= 16
      else:                      # Mosaic: lane dim a multiple of 128
        assert plan.q % 128 == 0
      if plan.n1 > 1:
        assert plan.m % plan.col_block == 0 and (plan.n1 // 2) % plan.row_block == 0
  assert pallas_conv.make_plan(1 << 20, "gpu").n1 > 1   # 1M tokens run two-pass
  with pytest.raises(ValueError, match="splits such sequences in halves"):
    pallas_conv.make_plan(1 << 21, "gpu")
  # Past the two-pass limit long_conv halves the sequence: GPU from 2M tokens, TPU from 8M.
  assert [pallas_conv.halvings(1 << e, "gpu") for e in (20, 21, 22)] == [0, 1, 2]
  assert [pallas_conv.halvings(1 << e, "tpu") for e in (22, 23)] == [0, 1]


def test_bad_inputs_raise():
  u, k, d_bias, gate, _ = _inputs(1, 2, 8, jnp.float32)
  with pytest.raises(ValueError, match="u \\[B, C, L\\]"):
    pallas_conv.long_conv(u, k[:, :4], d_bias, gate)
  with pytest.raises(ValueError, match="d_bias"):
    pallas_conv.long_conv(u, k, d_bias[:1], gate)
  with pytest.raises(ValueError, match="gate"):
    pallas_conv.long_conv(u, k, d_bias, gate[:, :1])
  with pytest.raises(ValueError, match="precision"):
    pallas_conv.long_conv(u, k, d_bias, gate, precision="fast")
  with pytest.raises(ValueError, match="spectra_dtype"):
    pallas_conv.long_conv(u, k, d_bias, gate, spectra_dtype="float16")


def test_model_with_pallas_conv_matches_parity_fixture():
  """tiny_1k (2 x 1024 tokens) through the Pallas path reproduces the official logits."""
  folder = shared_path("parity", "tiny_1k")
  loaded = hyena_jax.load(folder, conv_impl="pallas")
  model, cfg = loaded.model, loaded.config
  assert cfg.conv_impl == "pallas"
  tokens = jnp.asarray(np.load(folder / "tokens.npy"), jnp.int32)
  logits = nnx.jit(lambda m, x: m(x))(model, tokens)
  np.testing.assert_allclose(np.asarray(logits), np.load(folder / "logits.npy"),
                             rtol=1e-4, atol=1e-4)


def test_tf32_emulation_is_what_highest_avoids():
  """On GPU 'highest' runs three TF32 passes, 'default' one. Interpret mode emulates the TF32
  operand rounding, so CPU measures what tensor cores would do: one pass is ~3e-4 off the fft
  path (beyond F32_TOL), three passes are float32-close (the CASES above run them)."""
  args = _inputs(1, 2, 300, jnp.float32)
  ref = fftconv.fft_long_conv(*args[:4])
  errs = {}
  for precision in ("highest", "default"):
    out = jax.jit(functools.partial(pallas_conv.long_conv, interpret=True, platform="gpu",
                                    precision=precision))(*args[:4])
    errs[precision] = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
  assert errs["highest"] <= F32_TOL, errs
  assert 1e-5 < errs["default"] < 2e-3, errs


def test_bf16x3_sits_between_one_bf16_pass_and_highest_on_tpu():
  """'high' splits float32 operands into bf16 hi + lo and takes three one-pass products: ~5e-6
  relative error measured (gradients too), against ~4e-3 for one bf16 pass and ~3e-7 for
  'highest'. The split is written out, so interpret mode computes what the MXU would."""
  args = _inputs(2, 2, 1000, jnp.float32, seed=5)
  errs = {}
  for precision in ("highest", "high", "default"):
    out, grads = _value_and_grads(functools.partial(
        pallas_conv.long_conv, interpret=True, platform="tpu", max_onchip=1024,
        precision=precision), *args)
    ref_out, ref_grads = _value_and_grads(fftconv.fft_long_conv, *args)
    errs[precision] = max(float(jnp.abs(a - b).max() / jnp.abs(b).max())
                          for a, b in zip((out, *grads), (ref_out, *ref_grads)))
  assert errs["highest"] < 2e-6, errs
  assert 2e-6 < errs["high"] < 3e-5, errs
  assert errs["default"] > 1e-3, errs


def _errors(fn, args):
  """Max |fn - fft| / max |fft| of the output and of each gradient (du, dk, dD, dgate)."""
  got = jax.tree.leaves(_value_and_grads(fn, *args))
  ref = jax.tree.leaves(_value_and_grads(fftconv.fft_long_conv, *args))
  return [float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                / jnp.abs(b.astype(jnp.float32)).max()) for a, b in zip(got, ref)]


def test_bfloat16_spectra_err_like_bfloat16_and_only_that():
  """spectra_dtype='bfloat16' stores the two-pass intermediates in bfloat16: measured here
  ~2e-3 of the fft path on every output (float32 spectra: ~3e-7), within bfloat16's own
  rounding (3.9e-3) but far above float32 storage, so the storage really is bfloat16; the
  arithmetic stays float32. GPU rules with bf16 signals ('auto': one TF32 pass): ~6e-3, within
  the bfloat16 tolerance of the CASES."""
  tpu = functools.partial(pallas_conv.long_conv, interpret=True, platform="tpu", max_onchip=1024)
  args = _inputs(2, 3, 9000, jnp.float32)
  f32 = _errors(functools.partial(tpu, spectra_dtype="float32"), args)
  bf16 = _errors(functools.partial(tpu, spectra_dtype="bfloat16"), args)
  assert max(f32) <= F32_TOL, f32
  assert 3e-4 < min(bf16) and max(bf16) < 1e-2, bf16
  gpu = functools.partial(pallas_conv.long_conv, interpret=True, max_onchip=256,
                          spectra_dtype="bfloat16")
  assert max(_errors(gpu, _inputs(2, 3, 5000, jnp.bfloat16))) <= BF16_TOL


def _mesh_2x2():
  from hyena_jax.training import sharding
  return sharding.make_mesh(2, 2, 1, devices=jax.devices()[:4])


@pytest.mark.parametrize("options", [{}, {"max_fft": 256}], ids=["whole", "split_in_halves"])
def test_sharded_over_batch_axes_under_a_mesh_and_inside_shard_map(options):
  """Under `jax.set_mesh` the op shard_maps itself over data x fsdp (Mosaic cannot be
  partitioned by XLA); inside a user's shard_map it runs on the local block. Both give the fft
  path's values and gradients: dk and dD, summed over batch shards, test the vma handling (of
  the halves' loop carries too)."""
  from jax.sharding import PartitionSpec as P
  if jax.device_count() < 4:
    pytest.skip("needs 4 devices (conftest makes 8 fake CPU devices)")
  mesh = _mesh_2x2()
  args = _inputs(4, 3, 300, jnp.float32, seed=3)
  conv = functools.partial(pallas_conv.long_conv, interpret=True, **options)
  ref_out, ref_grads = _value_and_grads(fftconv.fft_long_conv, *args)

  with jax.set_mesh(mesh):
    out, grads = _value_and_grads(conv, *args)
  _assert_close(out, ref_out, F32_TOL, "output under set_mesh")
  for name, g, r in zip(("du", "dk", "dD", "dgate"), grads, ref_grads):
    _assert_close(g, r, F32_TOL, f"{name} under set_mesh")

  batch = P(("data", "fsdp"))
  inner = jax.shard_map(conv, mesh=mesh, in_specs=(batch, P(), P(), batch), out_specs=batch)
  out, grads = _value_and_grads(inner, *args)
  _assert_close(out, ref_out, F32_TOL, "output inside shard_map")
  for name, g, r in zip(("du", "dk", "dD", "dgate"), grads, ref_grads):
    _assert_close(g, r, F32_TOL, f"{name} inside shard_map")


@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "under_a_mesh"])
def test_two_pass_in_channel_groups(monkeypatch, sharded):
  """Long two-pass convolutions run channels in groups (memory), each writing its channels of
  the whole outputs in place; forced here at a small size, on one device and inside the
  op's own shard_map (one sequence per device there)."""
  if sharded and jax.device_count() < 4:
    pytest.skip("needs 4 devices (conftest makes 8 fake CPU devices)")
  plan = pallas_conv.make_plan(1000, "gpu", 512)
  local_batch = 1 if sharded else 2
  # 2 of the 6 channels a group
  monkeypatch.setattr(pallas_conv, "_GROUP_BYTES", 2 * local_batch * plan.kept * plan.m * 8)
  assert pallas_conv._channel_groups(plan, local_batch, 6) == 3
  args = _inputs(4 if sharded else 2, 6, 1000, jnp.float32, seed=4)
  conv = functools.partial(pallas_conv.long_conv, interpret=True, max_onchip=512)
  if sharded:
    with jax.set_mesh(_mesh_2x2()):
      out, grads = _value_and_grads(conv, *args)
  else:
    out, grads = _value_and_grads(conv, *args)
  ref_out, ref_grads = _value_and_grads(fftconv.fft_long_conv, *args)
  _assert_close(out, ref_out, F32_TOL, "grouped output")
  for name, g, r in zip(("du", "dk", "dD", "dgate"), grads, ref_grads):
    _assert_close(g, r, F32_TOL, f"grouped {name}")


@pytest.mark.parametrize("groups", [1, 3])
def test_one_group_keeps_column_spectra_instead_of_u_and_k(monkeypatch, capsys, groups):
  """In one channel group the backward reuses the forward's column spectra of u and of the
  filter (none recomputed) and keeps them instead of u and k; with several groups it keeps
  u and k (every group's spectra at once would defeat the grouping)."""
  plan = pallas_conv.make_plan(1000, "gpu", 512)
  monkeypatch.setattr(pallas_conv, "_GROUP_BYTES", 6 // groups * 2 * plan.kept * plan.m * 8)
  assert pallas_conv._channel_groups(plan, 2, 6) == groups
  u, k, d_bias, gate, _ = _inputs(2, 6, 1000, jnp.float32, seed=5)
  conv = functools.partial(pallas_conv.long_conv, interpret=True, max_onchip=512)
  ad_checkpoint.print_saved_residuals(conv, u, k, d_bias, gate)
  saved = [tuple(int(n) for n in dims.split(",") if n) for dims in
           re.findall(r"^\w+\[([\d,]*)\]", capsys.readouterr().out, re.MULTILINE)]
  spectra = [s for s in saved if s[-2:] in ((plan.kept, plan.m), (plan.p, plan.q))]
  signals = [s for s in saved if s == u.shape]            # u and gate have one shape
  filters = [s for s in saved if s == k.shape]
  if groups == 1:
    assert len(spectra) == 4 and len(signals) == 1 and not filters, saved
  else:
    assert not spectra and len(signals) == 2 and len(filters) == 1, saved


def test_channel_groups_share_one_copy_of_the_twiddles(monkeypatch):
  """The column twiddles are [kept, m], half the FFT size (17 MB each at 4M tokens on TPU): the
  program holds the same number of copies however many channel groups use them (a copy per
  group put 3.4 GB of constants into the v5p 4M step)."""
  plan = pallas_conv.make_plan(1000, "gpu", 512)
  args = _inputs(1, 6, 1000, jnp.float32, seed=6)

  def twiddle_copies(groups):
    monkeypatch.setattr(pallas_conv, "_GROUP_BYTES", 6 // groups * plan.kept * plan.m * 8)
    assert pallas_conv._channel_groups(plan, 1, 6) == groups
    def loss(*a):
      return jnp.sum(pallas_conv.long_conv(*a, interpret=True, max_onchip=512))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args[:4]).as_text()
    return len(re.findall(rf"stablehlo.constant dense<[^>]*> : tensor<{plan.kept}x{plan.m}xf32>",
                          text))

  one = twiddle_copies(1)
  assert one > 0 and twiddle_copies(3) == one


def test_auto_precision_spends_less_on_bfloat16_signals():
  """bfloat16 signals carry ~3.9e-3 relative rounding; one TF32 pass errs ~3e-4 and bf16x3
  ~5e-6 (the bfloat16 CASES above run both, within their tolerance), so 'auto' takes one TF32
  pass on GPU and bf16x3 on TPU there. float32 signals keep float32-accurate matmuls."""
  resolve = pallas_conv.resolve_precision
  assert resolve("auto", "gpu", jnp.bfloat16) == "default"
  assert resolve("auto", "gpu", jnp.float32) == "highest"
  assert resolve("auto", "tpu", jnp.bfloat16) == "high"
  assert resolve("auto", "tpu", jnp.float32) == "highest"
  assert resolve("highest", "gpu", jnp.bfloat16) == "highest"
