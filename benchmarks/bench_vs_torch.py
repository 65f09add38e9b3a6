"""Ours (JAX) against the PyTorch reference model on CPU, alternating in fresh processes.

  python benchmarks/bench_vs_torch.py                            # tiny-1k, L = 1k..131k, 2 rounds
  python benchmarks/bench_vs_torch.py --lengths=1024,8192 --rounds=3 --no-inference
  python benchmarks/bench_vs_torch.py --lengths=1024 --rounds=1 --repeats=1 --inference_count=64

Every (implementation, length) runs in its own child process (`--child=jax|torch`), and the
order alternates each round (round 0: jax then torch; round 1: torch then jax, ...), so neither
side profits from a warmer machine or suffers from the other's leftovers. Modes per length:
`forward` and `fwd+bwd` (summed next-token cross-entropy), tiny-1k, float32; each child runs one
warm-up call (JAX compiles there: `first_call_s`), then `--repeats` timed calls and keeps the
best. The table shows the best over rounds; the JSON also keeps every round.

Inference (`--no-inference` to skip): embedding (mean-pooled final hidden states) and scoring
(summed next-base log-likelihood) of `--inference_count` random 500 bp sequences with a tiny-1k
model, batch `--inference_batch`: ours through `hyena_jax.embed.embed` / `score.log_likelihood`,
torch with the same token ids and the reference module. Each runs in a fresh process and is
timed twice: cold (the first call: what a user running it once sees, JAX compilation included)
and warm (the same call again in that process).

ratio = torch time / jax time (> 1 means ours is faster). The parent records the 1-minute load
average around every child (column `load`: the highest seen for that row); on a busy machine
the numbers mean little. Writes benchmarks/results/vs_torch_cpu.json (`--out`). The parent
imports neither jax nor torch; children run with JAX_PLATFORMS=cpu and the XLA_FLAGS the package
sets, and torch with its default thread count.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

import cpu_models  # benchmarks/cpu_models.py

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FWD_MODES = ("forward", "fwd+bwd")
INFERENCE_MODES = ("embed", "score")
IMPLS = ("jax", "torch")


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny-1k", help="released config name")
  parser.add_argument("--lengths", default="1024,8192,32768,131072")
  parser.add_argument("--modes", default="forward,fwd+bwd",
                      help="forward,fwd+bwd (children also take embed or score)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up")
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; best is kept")
  parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True,
                      help="also time embedding and scoring (--no-inference to skip)")
  parser.add_argument("--inference_count", type=int, default=1000, help="sequences")
  parser.add_argument("--inference_length", type=int, default=500, help="bases per sequence")
  parser.add_argument("--inference_batch", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0, help="inference sequences' numpy seed")
  parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
  parser.add_argument("--torch_malloc_tuning", action="store_true",
                      help="give the torch child hyena_jax's malloc settings too (cpu_runtime.py); "
                      "off by default: the reference runs as its users run it")
  parser.add_argument("--out", default="")
  # Internal: what one child process runs.
  parser.add_argument("--child", choices=IMPLS, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Children: one implementation, one length (or one inference task), one JSON line on stdout.


def _random_dna(count: int, length: int, seed: int) -> list:
  import numpy as np  # pylint: disable=g-import-not-at-top
  codes = np.random.default_rng(seed).integers(0, 4, (count, length), dtype=np.uint8)
  letters = np.frombuffer(b"ACGT", np.uint8)[codes]
  return [row.tobytes().decode("ascii") for row in letters]


def _time_calls(call, repeats: int) -> dict:
  """One warm-up call, then `repeats` timed ones. `call()` must wait for its result."""
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return {"first_call_s": first, "times_s": times, "best_s": min(times)}


def _time_cold_warm(call, count: int) -> dict:
  """The same whole call twice in this fresh process: cold, then warm."""
  out = {}
  for key in ("cold", "warm"):
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    out[f"{key}_s"] = seconds
    out[f"{key}_seqs_per_s"] = count / seconds
  out["output_shape"] = list(result.shape)
  out["output_mean"] = float(result.mean())  # a sanity value (random weights: not comparable)
  return out


def _child_jax(args, modes) -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  import hyena_jax  # pylint: disable=g-import-not-at-top  # first: the package may set XLA_FLAGS
  from hyena_jax.inference import embed as embed_lib  # pylint: disable=g-import-not-at-top
  from hyena_jax.inference import score as score_lib  # pylint: disable=g-import-not-at-top
  from hyena_jax.model import config as config_lib  # pylint: disable=g-import-not-at-top
  from hyena_jax.model.hyenadna import HyenaLM  # pylint: disable=g-import-not-at-top

  out = {"impl": "jax", "versions": {"jax": jax.__version__,
                                     "jaxlib": importlib.metadata.version("jaxlib"),
                                     "flax": flax.__version__, "hyena_jax": hyena_jax.__version__},
         "xla_flags": os.environ.get("XLA_FLAGS"),
         "cpu_tuning": hyena_jax.cpu_runtime.configure(),
         "jax_platforms": os.environ.get("JAX_PLATFORMS"),
         "device": str(jax.devices()[0].device_kind), "results": []}
  if modes[0] in INFERENCE_MODES:
    seqs = _random_dna(args.inference_count, args.inference_length, args.seed)
    start = time.perf_counter()
    model = HyenaLM(config_lib.released(args.model, l_max=1026), rngs=nnx.Rngs(0))
    model.eval()
    out["model_init_s"] = time.perf_counter() - start
    for mode in modes:
      if mode == "embed":
        call = lambda: embed_lib.embed(model, seqs, batch_size=args.inference_batch)  # noqa: E731
      else:
        call = lambda: score_lib.log_likelihood(  # noqa: E731
            model, seqs, batch_size=args.inference_batch)
      out["results"].append({"mode": mode, **_time_cold_warm(call, len(seqs))})
    return out

  cfg = config_lib.released(args.model, l_max=max(args.length, 1026), dtype="float32")
  params, forward, loss_fn = cpu_models.jax_lm(cfg)
  forward = jax.jit(forward)
  fwd_bwd = jax.jit(jax.grad(loss_fn))
  ids = jax.random.randint(jax.random.key(0), (args.batch, args.length), 7, 11)
  for mode in modes:
    fn = forward if mode == "forward" else fwd_bwd
    timing = _time_calls(lambda: jax.block_until_ready(fn(params, ids)), args.repeats)
    out["results"].append({"mode": mode, "length": args.length, "batch": args.batch, **timing})
  return out


def _child_torch(args, modes) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  from hyena_jax.data import tokenizer as tok  # pylint: disable=g-import-not-at-top
  from hyena_jax.model import config as config_lib  # pylint: disable=g-import-not-at-top

  out = {"impl": "torch", "versions": {"torch": torch.__version__},
         "threads": torch.get_num_threads(), "results": []}
  torch.manual_seed(0)
  inference = modes[0] in INFERENCE_MODES
  if inference:
    seqs = _random_dna(args.inference_count, args.inference_length, args.seed)
  start = time.perf_counter()
  cfg = config_lib.released(args.model, l_max=1026 if inference else max(args.length, 1026))
  model = cpu_models.torch_lm(cfg)
  out["model_init_s"] = time.perf_counter() - start

  if inference:
    model.eval()
    tokenizer = tok.CharacterTokenizer()
    batch_size = args.inference_batch

    def batches():
      # The ids `inference.encode_record` gives ours: bases only, no [SEP], no padding (all the
      # sequences have the same length).
      for i in range(0, len(seqs), batch_size):
        ids = np.stack([tokenizer.encode(s, None, add_eos=False) for s in seqs[i:i + batch_size]])
        yield torch.from_numpy(ids).long()

    @torch.inference_mode()
    def embed():
      return np.concatenate([model.hyena(ids).mean(dim=1).numpy() for ids in batches()])

    @torch.inference_mode()
    def score():
      totals = []
      for ids in batches():
        logp = F.log_softmax(model(ids)[:, :-1].float(), dim=-1)
        picked = logp.gather(-1, ids[:, 1:, None])[..., 0]     # log p(x_t | x_<t), t = 1..n-1
        totals.append(picked.double().sum(dim=1).numpy())
      return np.concatenate(totals)

    for mode in modes:
      call = embed if mode == "embed" else score
      out["results"].append({"mode": mode, **_time_cold_warm(call, len(seqs))})
    return out

  ids = torch.randint(7, 11, (args.batch, args.length))

  def forward():
    with torch.inference_mode():
      model(ids)

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    vocab = logits.shape[-1]
    F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1),
                    reduction="sum").backward()

  for mode in modes:
    timing = _time_calls(forward if mode == "forward" else fwd_bwd, args.repeats)
    out["results"].append({"mode": mode, "length": args.length, "batch": args.batch, **timing})
  return out


def _child_main(args) -> None:
  modes = args.modes.split(",")
  kinds = {m in INFERENCE_MODES for m in modes}
  if any(m not in FWD_MODES + INFERENCE_MODES for m in modes) or len(kinds) != 1:
    raise ValueError(f"--modes={args.modes}: use forward/fwd+bwd, or embed/score, not both")
  if not kinds.pop() and args.length < 1:
    raise ValueError("--child needs --length for forward/fwd+bwd")
  out = _child_jax(args, modes) if args.child == "jax" else _child_torch(args, modes)
  print(json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------
# Parent: launches the children, alternating, and collects their JSON lines.


def _run_child(args, impl: str, modes: str, length: int | None, log: list) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), f"--child={impl}", f"--modes={modes}",
         f"--model={args.model}", f"--batch={args.batch}", f"--repeats={args.repeats}",
         f"--inference_count={args.inference_count}",
         f"--inference_length={args.inference_length}",
         f"--inference_batch={args.inference_batch}", f"--seed={args.seed}"]
  if length is not None:
    cmd.append(f"--length={length}")
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  if impl == "torch" and not args.torch_malloc_tuning:
    env["HYENA_JAX_CPU_TUNING"] = "0"  # importing hyena_jax.config must not tune torch's process
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  load_before = os.getloadavg()
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
  except subprocess.TimeoutExpired as e:
    tail = (e.stderr or b"")
    tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
    sys.exit(f"child {impl} {modes} L={length} timed out after {args.timeout:.0f} s\n"
             f"{' '.join(cmd)}\n--- stderr tail ---\n{tail[-4000:]}")
  wall = time.perf_counter() - start
  load_after = os.getloadavg()
  if proc.returncode != 0:
    sys.exit(f"child {impl} {modes} L={length} failed (exit {proc.returncode})\n"
             f"{' '.join(cmd)}\n--- stderr tail ---\n{proc.stderr[-4000:]}")
  result = None
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("{"):
      try:
        result = json.loads(line)
        break
      except json.JSONDecodeError:
        pass
  if result is None:
    sys.exit(f"child {impl} {modes} L={length} printed no JSON line\n--- stdout tail ---\n"
             f"{proc.stdout[-2000:]}\n--- stderr tail ---\n{proc.stderr[-4000:]}")
  result.update(load_before=list(load_before), load_after=list(load_after), wall_s=wall)
  log.append({"impl": impl, "modes": modes, "length": length, "wall_s": wall,
              "load_before": list(load_before), "load_after": list(load_after)})
  return result


def _order(round_: int) -> tuple:
  return IMPLS if round_ % 2 == 0 else IMPLS[::-1]


def _max_load(children: list) -> float:
  return max(max(c["load_before"][0], c["load_after"][0]) for c in children)


def _git_state() -> dict:
  try:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          timeout=30).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True, timeout=30).stdout.strip()
    return {"commit": head, "dirty": bool(dirty)}
  except (OSError, subprocess.SubprocessError):
    return {}


def _parent_main(args) -> None:
  lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
  modes = [m for m in args.modes.split(",") if m.strip()]
  if any(m not in FWD_MODES for m in modes):
    raise SystemExit(f"--modes={args.modes}: choose from {','.join(FWD_MODES)}")
  if args.rounds < 1 or args.repeats < 1:
    raise SystemExit("--rounds and --repeats must be >= 1")
  log: list = []
  # children[(impl, length)] / children[(impl, task)]: one result per round.
  children: dict = {}
  print(f"{args.model}, batch {args.batch}, float32, {args.rounds} round(s), best of "
        f"{args.repeats}; cpu_count {os.cpu_count()}, load {os.getloadavg()[0]:.1f}", flush=True)
  for round_ in range(args.rounds):
    for length in lengths:
      if not modes:
        break
      for impl in _order(round_):
        res = _run_child(args, impl, ",".join(modes), length, log)
        children.setdefault((impl, length), []).append(res)
        best = ", ".join(f"{r['mode']} {r['best_s'] * 1e3:.1f} ms" for r in res["results"])
        print(f"  round {round_} {impl:>5} L={length:>7}  {best}  "
              f"(load {_max_load([res]):.1f})", flush=True)
    if args.inference:
      for task in INFERENCE_MODES:
        for impl in _order(round_):
          res = _run_child(args, impl, task, None, log)
          children.setdefault((impl, task), []).append(res)
          r = res["results"][0]
          print(f"  round {round_} {impl:>5} {task:>7}  cold {r['cold_seqs_per_s']:,.0f} seq/s  "
                f"warm {r['warm_seqs_per_s']:,.0f} seq/s  (load {_max_load([res]):.1f})",
                flush=True)

  rows = []
  lines = []
  for length in lengths:
    for mode in modes:
      row = {"model": args.model, "mode": mode, "length": length, "batch": args.batch,
             "dtype": "float32", "rounds": {}}
      for impl in IMPLS:
        per_round = []
        for res in children[(impl, length)]:
          r = next(x for x in res["results"] if x["mode"] == mode)
          per_round.append({"best_s": r["best_s"], "times_s": r["times_s"],
                            "first_call_s": r["first_call_s"],
                            "load_before": res["load_before"], "load_after": res["load_after"]})
        row["rounds"][impl] = per_round
        row[f"{impl}_s"] = min(p["best_s"] for p in per_round)
        row[f"{impl}_first_call_s"] = min(p["first_call_s"] for p in per_round)
        row[f"{impl}_tokens_per_s"] = args.batch * length / row[f"{impl}_s"]
      row["ratio"] = row["torch_s"] / row["jax_s"]
      row["max_load1"] = _max_load(children[("jax", length)] + children[("torch", length)])
      rows.append(row)
      lines.append(f"  {mode:>7}  L={length:>7}   jax {row['jax_s'] * 1e3:9.1f} ms   torch "
                   f"{row['torch_s'] * 1e3:9.1f} ms   ratio {row['ratio']:5.2f}x   "
                   f"load {row['max_load1']:.1f}")
  if args.inference:
    for task in INFERENCE_MODES:
      row = {"model": args.model, "mode": task, "count": args.inference_count,
             "seq_length": args.inference_length, "batch": args.inference_batch,
             "dtype": "float32", "rounds": {}}
      for impl in IMPLS:
        per_round = []
        for res in children[(impl, task)]:
          r = res["results"][0]
          per_round.append({k: r[k] for k in ("cold_s", "warm_s", "output_shape", "output_mean")}
                           | {"model_init_s": res["model_init_s"],
                              "load_before": res["load_before"], "load_after": res["load_after"]})
        row["rounds"][impl] = per_round
        for key in ("cold", "warm"):
          seconds = min(p[f"{key}_s"] for p in per_round)
          row[f"{impl}_{key}_s"] = seconds
          row[f"{impl}_{key}_seqs_per_s"] = args.inference_count / seconds
      for key in ("cold", "warm"):
        row[f"{key}_ratio"] = row[f"torch_{key}_s"] / row[f"jax_{key}_s"]
      row["max_load1"] = _max_load(children[("jax", task)] + children[("torch", task)])
      rows.append(row)
      lines.append(
          f"  {task:>7}  N={args.inference_count} x {args.inference_length} bp B="
          f"{args.inference_batch}   cold: jax {row['jax_cold_seqs_per_s']:8,.0f} seq/s  torch "
          f"{row['torch_cold_seqs_per_s']:8,.0f} seq/s  ratio {row['cold_ratio']:5.2f}x   "
          f"warm: jax {row['jax_warm_seqs_per_s']:8,.0f} seq/s  torch "
          f"{row['torch_warm_seqs_per_s']:8,.0f} seq/s  ratio {row['warm_ratio']:5.2f}x   "
          f"load {row['max_load1']:.1f}")

  print(f"\nbest over {args.rounds} round(s); ratio = torch time / jax time (>1: ours is faster)")
  print("\n".join(lines))

  any_jax = next((c for k, v in children.items() if k[0] == "jax" for c in v), None)
  any_torch = next((c for k, v in children.items() if k[0] == "torch" for c in v), None)
  meta = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "cpu_count": os.cpu_count(), "platform": platform.platform(),
      "processor": platform.processor(), "python": platform.python_version(),
      "git": _git_state(), "argv": sys.argv[1:],
      "rounds": args.rounds, "repeats": args.repeats, "lengths": lengths, "modes": modes,
      "ratio": "torch_s / jax_s (>1: ours is faster)",
      "xla_flags_parent_env": os.environ.get("XLA_FLAGS"),
      "jax": any_jax and any_jax["versions"], "torch": any_torch and any_torch["versions"],
      "xla_flags": any_jax and any_jax["xla_flags"],
      "jax_device": any_jax and any_jax["device"],
      "torch_threads": any_torch and any_torch["threads"],
      "torch_malloc_tuning": args.torch_malloc_tuning,
      "load_max_1min": max((max(c["load_before"][0], c["load_after"][0]) for c in log),
                           default=None),
  }
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "vs_torch_cpu.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"meta": meta, "rows": rows, "children": log}, f, indent=1)
  print(f"wrote {out}")


def main():
  args = _parse_args()
  if args.child:
    _child_main(args)
  else:
    _parent_main(args)


if __name__ == "__main__":
  from hyena_jax import cpu_runtime  # pylint: disable=g-import-not-at-top
  cpu_runtime.configure()  # the CPU settings the command-line tools apply
  main()
