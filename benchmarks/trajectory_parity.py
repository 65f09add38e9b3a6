"""Training-trajectory parity: hyena_jax's pretraining steps against PyTorch with the official
optimizer setup, from one initialisation, on the same token batches.

    python benchmarks/trajectory_parity.py                  # 240 steps of tiny-1k (~3 min CPU)
    python benchmarks/trajectory_parity.py --steps 20 --d_model 32 --seq_len 64   # quick

What is compared (SPEC 5 and 4; float32, dropout off on both sides, so nothing random remains):
  * the PyTorch side is `hyena_jax.torch_reference.HyenaDNAForCausalLM` (written from the spec,
    independently of the JAX model) with its LM head tied to the embedding as upstream, trained
    the way the official Lightning code does it: torch.optim.AdamW (0.9, 0.999, 1e-8) with the
    `_optim` groups (weight decay 0.1, 0 on the implicit-filter MLP: its Linear layers and the
    shared Sin frequency), timm's CosineLRScheduler written out from its definition (warm-up from
    1e-6 over 1% of the steps, cosine to 0.1 x peak, stepped per optimizer step),
    clip_grad_norm_(1.0), and Lightning-style gradient accumulation (each micro-batch's mean
    loss divided by the accumulation, gradients summed) in the second stage;
  * the JAX side is hyena_jax itself: `run_lib.build_run` (the optimizer and schedule of the run
    config), `steps.make_train_step` per stage and `run_lib.stage_of`, with the parameters
    imported from the PyTorch initial state dict through `weights.load_into`;
  * two sequence-length stages (seq_len, then 2 x seq_len with grad_accum 2 at the same global
    batch), as the official sequence-length warm-up; the batches are windows of real human DNA
    ($HYENA_JAX_SHARED/data/human/pim1.hg19.fa; seeded random tokens where it is absent).

Reports the loss of every step on both sides (max relative difference), the final parameters'
max abs and relative difference, and writes benchmarks/results/<out_name>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def timm_cosine(step: int, *, peak: float, total: int, warmup: int, init: float = 1e-6,
                min_ratio: float = 0.1) -> float:
  """timm CosineLRScheduler(t_initial=total, lr_min=min_ratio*peak, warmup_t=warmup,
  warmup_lr_init=init, warmup_prefix=False, t_in_epochs=False, cycle_limit=1) at update `step`."""
  if step < warmup:
    return init + step * (peak - init) / warmup
  if step >= total:
    return min_ratio * peak
  lr_min = min_ratio * peak
  return lr_min + 0.5 * (peak - lr_min) * (1 + math.cos(math.pi * step / total))


def token_batches(stages, global_batch: int, seed: int, shared: pathlib.Path) -> list[np.ndarray]:
  """One int32 array [global_batch, seq_len + 1] per optimizer step: windows of real DNA."""
  from hyena_jax.data import tokenizer as tok
  fasta = shared / "data" / "human" / "pim1.hg19.fa"
  rng = np.random.default_rng(seed)
  if fasta.is_file():
    bases = "".join(line.strip() for line in fasta.read_text().splitlines()[1:]).upper()
    genome = tok.CharacterTokenizer().encode_batch([bases], len(bases), add_eos=False)[0]
  else:
    genome = rng.choice([tok.A, tok.C, tok.G, tok.T], size=200_000).astype(np.int32)
  out = []
  for steps, seq_len, _ in stages:
    for _ in range(steps):
      starts = rng.integers(0, len(genome) - seq_len - 1, size=global_batch)
      out.append(np.stack([genome[s:s + seq_len + 1] for s in starts]).astype(np.int32))
  return out


def model_config(args):
  from hyena_jax.model import config as config_lib
  return config_lib.from_dict(dict(
      d_model=args.d_model, n_layer=args.n_layer, d_inner=4 * args.d_model,
      l_max=2 * args.seq_len + 2, shift=0.0, embed_dropout=0.0, resid_dropout=0.0,
      hyena_dropout=0.0))


def run_config(args, cfg):
  import dataclasses

  from hyena_jax.training import run_config as run_config_lib
  config = run_config_lib.base_config()
  config.model.update(dataclasses.asdict(cfg))
  config.train.global_batch_size = args.batch
  half = args.steps // 2
  config.train.stages = ((half, args.seq_len, 1), (args.steps - half, 2 * args.seq_len, 2))
  config.optim.learning_rate = args.lr
  config.optim.warmup_fraction = args.warmup_fraction
  config.mesh.update(data=1, fsdp=1, sequence=1)
  return config


def torch_initial_state(cfg, seed: int) -> dict:
  """A PyTorch initial state dict (numpy) drawn as the official `_init_weights` does (SPEC 2.5),
  for both sides to start from."""
  import torch

  from hyena_jax.interop import formats, torch_reference
  torch.manual_seed(seed)
  model = torch_reference.HyenaDNAForCausalLM({**formats.hf_config(cfg), "shift": cfg.shift})
  model.lm_head.weight = model.hyena.backbone.embeddings.word_embeddings.weight  # tied
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        module.weight.normal_(0.0, cfg.initializer_range)
        if getattr(module, "bias", None) is not None:
          module.bias.zero_()
      if name.endswith(("out_proj", "fc2")):
        module.weight.normal_(0.0, cfg.initializer_range / math.sqrt(2 * cfg.n_layer))
      if name.endswith("filter_fn"):
        module.bias.normal_(0.0, 1.0)  # D; the short conv keeps PyTorch's default init
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def run_torch(cfg, state: dict, batches, config) -> tuple[list[float], dict]:
  import torch

  from hyena_jax.interop import formats, torch_reference
  torch.manual_seed(0)
  model = torch_reference.HyenaDNAForCausalLM({**formats.hf_config(cfg), "shift": cfg.shift})
  model.lm_head.weight = model.hyena.backbone.embeddings.word_embeddings.weight
  torch_reference.load_weights(model, {k: torch.from_numpy(v) for k, v in state.items()})
  model.train()
  o = config.optim
  filter_params = [p for n, p in model.named_parameters() if "filter_fn.implicit_filter" in n]
  ids = {id(p) for p in filter_params}
  others = [p for p in model.parameters() if id(p) not in ids]
  optimizer = torch.optim.AdamW(
      [{"params": others, "weight_decay": o.weight_decay},
       {"params": filter_params, "weight_decay": o.filter_weight_decay}],
      lr=o.init_lr, betas=(o.b1, o.b2), eps=o.eps)
  total = sum(s[0] for s in config.train.stages)
  warmup = int(o.warmup_fraction * total)
  bounds = np.cumsum([s[0] for s in config.train.stages])
  losses = []
  for step, batch in enumerate(batches):
    lr = timm_cosine(step, peak=o.learning_rate, total=total, warmup=warmup, init=o.init_lr,
                     min_ratio=o.min_lr_ratio)
    for group in optimizer.param_groups:
      group["lr"] = lr
    accum = config.train.stages[int(np.searchsorted(bounds, step, side="right"))][2]
    optimizer.zero_grad()
    step_loss = 0.0
    for micro in np.split(torch.from_numpy(batch).long(), accum):  # consecutive micro-batches
      logits = model(micro[:, :-1])
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               micro[:, 1:].reshape(-1))
      (loss / accum).backward()
      step_loss += float(loss.detach()) / accum
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
    optimizer.step()
    losses.append(step_loss)
  return losses, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def run_jax(cfg, state: dict, batches, config) -> tuple[list[float], dict]:
  import jax
  from flax import nnx

  from hyena_jax.interop import weights
  from hyena_jax.model.hyenadna import HyenaLM
  from hyena_jax.training import run as run_lib
  from hyena_jax.training import steps as steps_lib
  run = run_lib.build_run(config, devices=jax.devices()[:1])
  canonical, _, _ = weights.canonicalize(
      {"hyena." + k if not k.startswith(("hyena.", "lm_head")) else k: v
       for k, v in state.items()})
  model = weights.load_into(HyenaLM(cfg, rngs=nnx.Rngs(0)), cfg, canonical)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  train_state = {"step": jax.numpy.zeros((), jax.numpy.int32), "params": params,
                 "opt_state": run.tx.init(params)}
  step_fns = [jax.jit(steps_lib.make_train_step(run.graphdef, run.tx, run.schedule,
                                                grad_accum=accum, seed=0))
           for _, _, accum in config.train.stages]
  losses = []
  for step, batch in enumerate(batches):
    host = {"inputs": batch[:, :-1], "targets": batch[:, 1:],
            "loss_mask": np.ones(batch[:, 1:].shape, np.float32)}
    train_state, metrics = step_fns[run_lib.stage_of(run, step)](train_state, host)
    losses.append(float(metrics["loss"]))
  final = {e.torch_key: e.to_torch(np.asarray(_get(train_state["params"], e.path)))
           for e in weights.key_map(cfg)}
  return losses, final


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def compare(cfg, torch_final: dict, jax_final: dict) -> dict:
  from hyena_jax.interop import weights
  canonical, _, _ = weights.canonicalize(torch_final)
  worst = {"max_abs": 0.0, "max_rel": 0.0, "key": ""}
  for key, value in jax_final.items():
    ref = canonical[key]
    diff = float(np.abs(value - ref).max())
    rel = diff / max(float(np.abs(ref).max()), 1e-12)
    if rel > worst["max_rel"]:
      worst = {"max_abs": diff, "max_rel": rel, "key": key}
  return worst


def trajectories(args, shared: pathlib.Path) -> dict:
  """Runs both sides; returns losses, their relative differences and the final-parameter gap."""
  cfg = model_config(args)
  config = run_config(args, cfg)
  batches = token_batches(config.train.stages, args.batch, args.seed, shared)
  state = torch_initial_state(cfg, args.seed)
  start = time.perf_counter()
  torch_losses, torch_final = run_torch(cfg, state, batches, config)
  torch_seconds = time.perf_counter() - start
  start = time.perf_counter()
  jax_losses, jax_final = run_jax(cfg, state, batches, config)
  jax_seconds = time.perf_counter() - start
  t, j = np.array(torch_losses), np.array(jax_losses)
  rel = np.abs(j - t) / np.abs(t)
  return {"torch_losses": torch_losses, "jax_losses": jax_losses, "relative_diff": rel.tolist(),
          "max_relative_diff": float(rel.max()), "argmax_step": int(rel.argmax()),
          "params": compare(cfg, torch_final, jax_final),
          "stages": [list(s) for s in config.train.stages],
          "seconds": {"torch": round(torch_seconds, 1), "jax": round(jax_seconds, 1)}}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=240)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--n_layer", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=256, help="first stage; the second is 2x")
  parser.add_argument("--batch", type=int, default=8, help="global batch (both stages)")
  parser.add_argument("--lr", type=float, default=6e-4)
  parser.add_argument("--warmup_fraction", type=float, default=0.01,
                      help="of the steps (official 1%%)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--shared", default=os.environ.get(
      "HYENA_JAX_SHARED", str(ROOT.parent / "shared")))
  parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"))
  parser.add_argument("--out_name", default="trajectory_parity")
  args = parser.parse_args()
  result = trajectories(args, pathlib.Path(args.shared))
  t, j, rel = result["torch_losses"], result["jax_losses"], result["relative_diff"]
  print(f"{'step':>5} {'torch loss':>12} {'jax loss':>12} {'rel diff':>10}")
  for step in sorted({0, 1, 2, args.steps // 2 - 1, args.steps // 2, args.steps - 1,
                      result["argmax_step"]}):
    print(f"{step:>5} {t[step]:12.7f} {j[step]:12.7f} {rel[step]:10.2e}")
  p = result["params"]
  print(f"stages {result['stages']}; max relative loss difference {result['max_relative_diff']:.2e} "
        f"(step {result['argmax_step']}); final parameters: max relative difference "
        f"{p['max_rel']:.2e} ({p['key']}, max abs {p['max_abs']:.2e}); seconds {result['seconds']}")
  out = pathlib.Path(args.output)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{args.out_name}.json"
  path.write_text(json.dumps({"arguments": vars(args), **result}, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
