"""The bounded-memory forward (inference/long_forward.py) computes what the plain forward does."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hyena_jax.errors import InputError
from hyena_jax.inference import long_forward, score
from hyena_jax.model.config import HyenaConfig, released
from hyena_jax.model.hyenadna import HyenaLM

# Chunks of 100 positions over 777 (the last chunk overlaps the one before it) and groups of 8
# of 32 channels: every seam of the chunked computation is crossed.
SIZES = long_forward.Plan(chunk=100, group=8, bytes=0)


@pytest.fixture(scope="module")
def case():
  cfg = HyenaConfig(d_model=32, n_layer=3, d_inner=64, filter_order=16, l_max=1000)
  model = HyenaLM(cfg, rngs=nnx.Rngs(0))
  model.eval()
  ids = jnp.asarray(np.random.default_rng(0).integers(7, 11, (2, 777)), jnp.int32)
  return model, ids


def test_hidden_states_and_kept_layers_equal_the_plain_forward(case):
  model, ids = case
  want = model.backbone(ids, return_layers=True)
  hidden, kept = long_forward.hidden_states(model, ids, layers=(0, 2), sizes=SIZES)
  np.testing.assert_allclose(hidden, want.hidden, rtol=0, atol=1e-5)
  assert sorted(kept) == [0, 2]
  for i in (0, 2):
    np.testing.assert_allclose(kept[i], want.layers[i], rtol=0, atol=1e-5)
  # A wrong seam would show up: positions just after a chunk boundary, the overlapped last chunk.
  assert float(jnp.abs(hidden - want.hidden).max()) < 1e-5


def test_token_log_probs_and_last_logits_equal_the_plain_ones(case):
  model, ids = case
  got = long_forward.token_log_probs(model, ids, sizes=SIZES)
  want = score._token_logp(model, ids)
  assert bool(jnp.isnan(got[:, 0]).all())
  np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=0, atol=2e-5)
  np.testing.assert_allclose(long_forward.last_logits(model, ids), model(ids)[:, -1],
                             rtol=0, atol=2e-5)


def test_the_path_and_the_plan_follow_the_memory_budget():
  cfg = released("large-1m")
  assert not long_forward.wants_long_path(cfg, 1, 262_144, max_memory_gb=16)  # 8.8 GB jitted
  assert long_forward.wants_long_path(cfg, 1, 262_144, max_memory_gb=6)
  assert long_forward.wants_long_path(cfg, 1, 1_000_000, max_memory_gb=20)
  plan = long_forward.plan(cfg, 1, 1_000_000, max_memory_gb=12)
  assert plan.bytes <= 12 * 2 ** 30 and plan.group >= 16
  with pytest.raises(InputError, match=r"1 x 1,000,000 tokens needs at least .* GiB, more than "
                     r"the 2.0 GiB allowed .*about [\d,]+ tokens per sequence fit"):
    long_forward.plan(cfg, 1, 1_000_000, max_memory_gb=2)


def test_embed_and_score_take_the_long_path_for_long_inputs(case, monkeypatch):
  from hyena_jax.inference import embed
  model, ids = case
  seqs = ["ACGT" * 50 + "GATTACA", "TTGACA" * 30]
  want_scores = [s for _, s in score.score_sequences(model, seqs)]
  want_emb = embed.embed(model, seqs, layers="final,0", pooling="mean_nonpad")
  monkeypatch.setattr(long_forward, "wants_long_path", lambda *a: True)  # as if memory were short
  calls = []
  hidden_states = long_forward.hidden_states
  monkeypatch.setattr(long_forward, "hidden_states",
                      lambda *a, **k: calls.append(1) or hidden_states(*a, **k))
  got_scores = [s for _, s in score.score_sequences(model, seqs)]
  got_emb = embed.embed(model, seqs, layers="final,0", pooling="mean_nonpad")
  assert len(calls) >= 2
  for got, want in zip(got_scores, want_scores):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
  np.testing.assert_allclose(got_emb, want_emb, rtol=0, atol=1e-5)
