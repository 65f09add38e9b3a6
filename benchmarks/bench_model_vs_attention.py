"""Whole-model train step: HyenaDNA vs a same-size attention Transformer, time vs length.

The comparison of the HyenaDNA paper's Figure 4.1 (runtime of forward+backward, 2 layers,
width 128, batch 1, gradient checkpointing; Hyena reported 160x faster than FlashAttention at
1M tokens). Both models here have the same width, depth, MLP (d_inner = 4 d), vocabulary, tied
head, pre-norm blocks and about 12 d^2 parameters per block; the Transformer's mixer is
qkv-projection -> causal `jax.nn.dot_product_attention` (cuDNN flash attention on GPU) ->
out-projection, with no positional encoding (it does not change the cost). One train step is
next-token cross-entropy, its gradient and an AdamW update, jitted, with the state donated.
Lengths that run out of memory are recorded as "oom"; once a model's step exceeds
--max-step-s, its longer lengths are recorded as "skipped".

Full run on a GPU (writes benchmarks/results/model_vs_attention.json and .png):
    python benchmarks/bench_model_vs_attention.py
CPU smoke:
    python benchmarks/bench_model_vs_attention.py --lengths 256,1024 --models hyena-fft,attention \
        --d-model 32 --reps 2
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from bench_long_conv import device_info, int_list, is_oom, save
from flax import nnx

from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM

VOCAB = 16


class AttentionBlock(nnx.Module):
  """Pre-norm block: x + out(attn(qkv(norm1 x))), then x + fc2(gelu(fc1(norm2 x)))."""

  def __init__(self, d: int, n_heads: int, d_inner: int, dtype, implementation: str | None,
               *, rngs: nnx.Rngs):
    self.n_heads, self.dtype, self.implementation = n_heads, dtype, implementation
    self.norm1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, dtype=dtype, rngs=rngs)
    self.out = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, d_inner, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(d_inner, d, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, d] float32 residual stream -> same."""
    b, length, d = x.shape
    qkv = self.qkv(self.norm1(x).astype(self.dtype)).reshape(b, length, 3, self.n_heads, -1)
    attn = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
                                        implementation=self.implementation)  # [B, L, H, dh]
    x = x + self.out(attn.reshape(b, length, d)).astype(jnp.float32)
    h = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x).astype(self.dtype)), approximate=True))
    return x + h.astype(jnp.float32)


class AttentionLM(nnx.Module):
  """Embedding, attention blocks (each rematerialised when `remat`), final norm, tied head."""

  def __init__(self, d: int, n_layer: int, n_heads: int, dtype, implementation: str | None,
               remat: bool, *, rngs: nnx.Rngs):
    self.remat = remat
    self.embed = nnx.Embed(VOCAB, d, rngs=rngs)
    self.layers = nnx.List([AttentionBlock(d, n_heads, 4 * d, dtype, implementation, rngs=rngs)
                            for _ in range(n_layer)])
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids: [B, L] -> logits [B, L, VOCAB] float32."""
    x = self.embed(ids).astype(jnp.float32)
    for block in self.layers:
      x = nnx.remat(lambda blk, h: blk(h))(block, x) if self.remat else block(x)
    return jnp.einsum("bld,vd->blv", self.ln_f(x), self.embed.embedding[...].astype(jnp.float32))


def build(model: str, length: int, args: argparse.Namespace) -> nnx.Module:
  on_gpu = jax.default_backend() == "gpu"
  dtype = jnp.dtype(args.dtype)
  rngs = nnx.Rngs(0)
  if model.startswith("hyena-"):
    cfg = HyenaConfig(d_model=args.d_model, n_layer=args.n_layer, d_inner=4 * args.d_model,
                      l_max=length, embed_dropout=0.0, dtype=args.dtype,
                      conv_impl=model.removeprefix("hyena-"),
                      remat="block" if args.remat else "none")
    return HyenaLM(cfg, rngs=rngs)
  # cuDNN flash attention needs 16-bit inputs.
  if on_gpu and dtype == jnp.float32:
    dtype = jnp.bfloat16
  heads = max(1, args.d_model // args.head_dim)
  return AttentionLM(args.d_model, args.n_layer, heads, dtype, "cudnn" if on_gpu else None,
                     args.remat, rngs=rngs)


def make_train_step(model: nnx.Module, lr: float = 1e-4):
  """Returns (step, state): step(state, ids) -> (state, loss), jitted, state donated."""
  optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, ids):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(m):
      logits = m(ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return step, state


def time_train_step(model: nnx.Module, ids: jax.Array, reps: int) -> tuple[float, float]:
  step, state = make_train_step(model)
  state, loss = step(state, ids)              # compile + warm-up
  jax.block_until_ready(loss)
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    state, loss = step(state, ids)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return statistics.median(times), float(loss)


def count_params(model: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", type=int_list, default=[1 << e for e in range(10, 21)])
  parser.add_argument("--models", default="hyena-fft,hyena-pallas,attention",
                      help="comma-separated: hyena-fft, hyena-pallas, attention")
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--n-layer", type=int, default=2)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--no-remat", dest="remat", action="store_false",
                      help="disable per-block gradient checkpointing (on by default, as the paper)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--max-step-s", type=float, default=60.0,
                      help="after a step slower than this, skip the model's longer lengths")
  parser.add_argument("--name", default="model_vs_attention")
  args = parser.parse_args()
  models = [m for m in args.models.split(",") if m]
  bad = set(models) - {"hyena-fft", "hyena-pallas", "attention"}
  if bad:
    parser.error(f"unknown model(s) {sorted(bad)}; choose from hyena-fft, hyena-pallas, attention")
  info = device_info()
  print(f"device: {info['device_kind']} ({info['platform']})")
  rows, too_slow = [], set()
  for length in sorted(args.lengths):
    ids = jax.random.randint(jax.random.key(length), (args.batch, length), 0, VOCAB)
    for name in models:
      row = {"model": name, "mode": "train step", "length": length, "batch": args.batch}
      if name in too_slow:
        row["status"] = "skipped"
      else:
        try:
          model = build(name, length, args)
          row["params"] = count_params(model)
          seconds, loss = time_train_step(model, ids, args.reps)
          row.update(time_ms=seconds * 1e3, loss=loss)
          if seconds > args.max_step_s:
            too_slow.add(name)
        except Exception as err:  # noqa: BLE001 - record OOMs and go on; re-raise anything else
          if not is_oom(err):
            raise
          row["status"] = "oom"
      rows.append(row)
      status = row.get("status") or f"{row['time_ms']:10.2f} ms  ({row['params']:,} params)"
      print(f"{name:>13} L={length:>8}  {status}", flush=True)
  by_length = {}
  for r in rows:
    by_length.setdefault(r["length"], {})[r["model"]] = r.get("time_ms")
  for length, times in sorted(by_length.items()):
    if times.get("attention"):
      for name, t in times.items():
        if name != "attention" and t:
          print(f"L={length:>8}: {name} speed-up over attention {times['attention'] / t:.2f}x")
  save(args.name, rows, args, f"train step, {args.n_layer} layers, d={args.d_model}, "
       f"batch {args.batch}, {info['device_kind']}", key="model")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
