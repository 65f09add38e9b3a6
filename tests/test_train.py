"""Training: learning on real DNA, sharded == single device, exact resume, recipe details."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hyena_jax.training import checkpoint as ckpt_lib
from hyena_jax.training import distributed, optim
from hyena_jax.training import pretrain as train
from hyena_jax.training import run as run_lib
from hyena_jax.training import run_config, sharding, steps


def tiny_config(stages=((4, 64, 1), (4, 128, 2))) -> ml_collections.ConfigDict:
  config = run_config.release_config("tiny-1k")
  config.model.update(d_model=32, n_layer=2, d_inner=64, filter_order=16, l_max=130)
  config.train.global_batch_size = 8
  config.train.stages = stages
  config.train.log_every_steps = 2
  config.optim.learning_rate = 3e-3
  config.eval.every_steps = 0
  config.eval.num_batches = 1
  config.eval.batch_size = 8
  config.checkpoint.every_steps = 1000
  config.checkpoint.async_save = False
  config.mesh.data = 1  # single device unless a test asks for more
  return config


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _params(workdir):
  model, _, step = ckpt_lib.restore_model(workdir)
  return step, jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_a_few_steps_lower_the_loss_on_the_bundled_genome(tmp_path):
  config = tiny_config(stages=((30, 128, 1),))
  config.train.log_every_steps = 5
  final = train.train_and_evaluate(config, str(tmp_path))
  losses = [m["loss"] for m in _metrics(tmp_path) if "loss" in m]
  assert losses[-1] < losses[0] - 0.5, losses          # from ~ln(16) towards ln(4)
  assert final["valid_loss"] < losses[0] - 0.5 and np.isfinite(final["valid_perplexity"])
  assert (tmp_path / "curves.png").stat().st_size > 1000
  assert any(p.startswith("events") for p in os.listdir(tmp_path / "tensorboard"))


def test_interrupted_run_resumes_bitwise_identically_across_a_stage_boundary(tmp_path,
                                                                            monkeypatch):
  config = tiny_config()
  straight, pieces = tmp_path / "straight", tmp_path / "pieces"
  train.train_and_evaluate(config, str(straight))
  # The interrupted run uses a relative workdir, as README's command does: orbax refuses
  # relative checkpoint paths, so this fails unless the project makes them absolute.
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(config, "pieces", stop_after_steps=3)   # inside stage 0
  train.train_and_evaluate(config, "pieces", stop_after_steps=3)   # 3 -> 6, crosses step 4
  train.train_and_evaluate(config, "pieces")                       # 6 -> 8
  def by_step(rows):  # the interrupted run also logs the steps where it stopped (3 and 6)
    return {(r["step"], "loss" in r): {k: v for k, v in r.items() if k != "tokens_per_s"}
            for r in rows}
  expected, got = by_step(_metrics(straight)), by_step(_metrics(pieces))
  assert set(got) == set(expected) | {(3, True), (6, True)}
  assert {k: got[k] for k in expected} == expected
  step_a, params_a = _params(straight)
  step_b, params_b = _params(pieces)
  assert step_a == step_b == 8
  for a, b in zip(params_a, params_b):
    np.testing.assert_array_equal(a, b)


def test_incompatible_or_damaged_workdir_and_bad_configs_are_refused(tmp_path):
  config = tiny_config(stages=((2, 64, 1),))
  train.train_and_evaluate(config, str(tmp_path), stop_after_steps=1)
  other = tiny_config(stages=((2, 64, 1),))
  other.model.d_model = 48
  with pytest.raises(ValueError, match="model.d_model was 32"):
    train.train_and_evaluate(other, str(tmp_path))
  # A damaged checkpoint is named, with what to do about it (more in test_resume.py).
  for path in (tmp_path / "checkpoints" / "1" / "params").rglob("*"):
    if path.is_file() and "manifest" not in path.name and path.stat().st_size > 100:
      path.write_bytes(b"garbage")
  with pytest.raises(ckpt_lib.DamagedCheckpointError,
                     match="step 1 is damaged: .*params cannot be restored"):
    train.train_and_evaluate(config, str(tmp_path))
  bad = tiny_config(stages=((2, 256, 1),))
  with pytest.raises(ValueError, match="exceeds model.l_max=130"):
    run_config.validate(bad)
  bad = tiny_config(stages=((2, 64, 3),))
  with pytest.raises(ValueError, match="grad_accum=3 does not divide"):
    run_config.validate(bad)
  bad = tiny_config()
  bad.train.global_batch_size = 12
  with pytest.raises(ValueError, match="not divisible by the 8 data-parallel devices"):
    run_config.validate(bad, data_parallel=8)
  locked = tiny_config()
  locked.lock()
  with pytest.raises(AttributeError):
    locked.train.global_bach_size = 4


def test_sigterm_and_ctrl_c_request_a_checkpointed_stop():
  import signal
  with distributed.Preemption() as preemption:
    assert not preemption.requested
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested and preemption.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is not preemption._handler
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
  try:
    with distributed.Preemption() as preemption:
      os.kill(os.getpid(), signal.SIGINT)              # Ctrl-C: save, then stop
      assert preemption.signum == signal.SIGINT
      with pytest.raises(KeyboardInterrupt):           # Ctrl-C again: stop at once
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # nohup / background job
    with distributed.Preemption() as preemption:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN       # left ignored
  finally:
    signal.signal(signal.SIGINT, previous)


def test_sharded_step_matches_single_device_and_shards_parameters():
  config = tiny_config(stages=((1, 96, 2),))
  config.model.update(d_model=64, d_inner=256)    # fc1/fc2 reach the FSDP size threshold
  config.train.global_batch_size = 16
  config.mesh.update(data=2, fsdp=4)
  run = run_lib.build_run(config)
  state = run_lib.init_state(run.model_cfg, run.tx, 0)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(7, 11, (16, 96)).astype(np.int32),
           "targets": rng.integers(7, 11, (16, 96)).astype(np.int32),
           "loss_mask": np.ones((16, 96), np.float32)}
  step_fn = steps.make_train_step(run.graphdef, run.tx, run.schedule, grad_accum=2, seed=0)
  single_state, single_metrics = jax.jit(step_fn)(state, batch)

  batch_sharding = sharding.batch_sharding(run.mesh)
  compiled = jax.jit(step_fn, in_shardings=(run.state_shardings, batch_sharding),
                     out_shardings=(run.state_shardings, None)).lower(state, batch).compile()
  sharded_state, sharded_metrics = compiled(jax.device_put(state, run.state_shardings),
                                            jax.device_put(batch, batch_sharding))
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(sharded_state["params"]), jax.tree.leaves(single_state["params"])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
  layer = sharded_state["params"]["backbone"]["layers"][0]
  fc1 = layer["mlp"]["fc1"]["kernel"]                          # [64, 256]: largest axis on fsdp
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert fc1.addressable_shards[0].data.shape == (64, 64)
  mu = sharded_state["opt_state"][1].inner_states["default"].inner_state[0].mu
  assert mu["backbone"]["layers"][0]["mlp"]["fc1"]["kernel"].sharding.spec == fc1.sharding.spec
  assert layer["mixer"]["in_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec()
  # FFTs stay device-local: no all-gather carries a length-96 (activation-shaped) operand.
  gathers = [line for line in compiled.as_text().splitlines() if "all-gather(" in line]
  assert gathers, "FSDP parameters should be all-gathered"
  for line in gathers:
    shape = line.split("=")[1].split("all-gather(")[0]
    assert "96" not in shape, line


def test_context_parallel_train_step_matches_single_device():
  config = tiny_config(stages=((1, 64, 1),))
  config.mesh.update(data=2, fsdp=1, sequence=4)
  run = run_lib.build_run(config)
  assert run.forward is not None
  state = run_lib.init_state(run.model_cfg, run.tx, 0)
  rng = np.random.default_rng(1)
  batch = {"inputs": rng.integers(7, 11, (8, 64)).astype(np.int32),
           "targets": rng.integers(7, 11, (8, 64)).astype(np.int32),
           "loss_mask": (rng.random((8, 64)) > 0.1).astype(np.float32)}
  kwargs = dict(grad_accum=1, seed=0)
  single = jax.jit(steps.make_train_step(run.graphdef, run.tx, run.schedule, **kwargs))
  split = jax.jit(steps.make_train_step(run.graphdef, run.tx, run.schedule, forward=run.forward,
                                        **kwargs),
                  in_shardings=(run.state_shardings, sharding.batch_sharding(run.mesh)))
  (s1, m1), (s2, m2) = single(state, batch), split(state, batch)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s2["params"]), jax.tree.leaves(s1["params"])):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_weight_decay_groups_and_learning_rate_schedule():
  cfg = tiny_config()
  run = run_lib.build_run(cfg)
  labels = optim.weight_decay_labels(run.abstract_state["params"])
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(labels)}
  filter_keys = [k for k, v in flat.items() if v == "filter"]
  assert all("filter_fn" in k for k in filter_keys)
  assert any(k.endswith("['freq']") for k in filter_keys)
  assert any("['implicit_filter'][0]['kernel']" in k for k in filter_keys)
  assert flat["['backbone']['layers'][0]['mixer']['filter_fn']['bias']"] == "default"  # D decays
  assert flat["['backbone']['word_embeddings']['embedding']"] == "default"

  tx = optim.make_optimizer(learning_rate=1.0, weight_decay=0.1, grad_clip=0.0)
  params = jax.tree.map(jnp.ones_like, run_lib.init_state(run.model_cfg, run.tx, 0)["params"])
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  upd = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(updates)}
  for key, value in upd.items():
    expected = 0.0 if flat[key] == "filter" else -0.1
    np.testing.assert_allclose(value, expected, atol=1e-7, err_msg=key)

  sched = optim.learning_rate_schedule(6e-4, total_steps=1000, warmup_steps=10)
  np.testing.assert_allclose(sched(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(sched(10), 6e-4 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.01))),
                             rtol=1e-5)
  np.testing.assert_allclose(sched(1000), 6e-5, rtol=1e-5)
  np.testing.assert_allclose(sched(5000), 6e-5, rtol=1e-5)


def test_1m_config_train_step_lowers_on_cpu():
  import importlib.util

  from hyena_jax.training import aot
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "1m.py")
  spec = importlib.util.spec_from_file_location("config_1m", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.mesh.data = 8
  lowered = aot.lower_train_step(config)          # abstract inputs: nothing is allocated
  text = lowered.as_text()
  assert "1000000" in text and "fft" in text.lower()


def test_curves_keep_the_trend_visible_past_an_outlier():
  """The default run's shape: train loss logged from step 25 near 1.4, a first validation at
  the final length (step 100) far above it. The axis keeps the bulk and the title names the
  point above it; a run without outliers is left alone."""
  from hyena_jax.training import metrics_writer
  train = [(s, 1.45 - 0.0003 * s) for s in range(25, 301, 25)]
  valid = [(100, 1.615), (200, 1.37), (300, 1.36)]
  (low, top), title = metrics_writer.clipped_y_range(train + valid)
  assert low < min(v for _, v in train + valid) and max(v for _, v in train) < top < 1.615
  assert title.endswith("1 point(s) above it, the highest 1.61 at step 100")
  assert metrics_writer.clipped_y_range(train) == (None, "")
