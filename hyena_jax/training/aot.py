r"""Ahead-of-time lowering and compilation of the train step (no parameters are allocated).

With the accelerator wheels installed (`pip install -e .[tpu]` / `.[cuda12]`) the real TPU and
GPU compilers run on any CPU host, deviceless: `target_devices("v5e-4")` describes a TPU slice
(libtpu) or an NVIDIA GPU (XLA:GPU with Triton and ptxas from the nvidia wheels, configured by a
GpuTargetConfig proto in hyena_jax/gpu_targets/). Set `JAX_PLATFORMS=cpu` and
`TPU_SKIP_MDS_QUERY=1` before jax is imported (`python -m hyena_jax.aot` does), so that libtpu does
not look for TPU hardware. `compile_for_target` then reports what the compiler says: per-device
memory against the chip's HBM, compile time, which custom kernels the program holds, and the
program's flops, HBM bytes and roofline bound (`roofline.py`).

As a program (`python -m hyena_jax.aot`; launch/aot_compile.py is a thin launcher of the same):
  # large-1m's last stage on a v5p-8 slice and on one H100 (real compilers, deviceless):
  python -m hyena_jax.aot --config=configs/1m.py --target=v5p-8,h100
  # the long convolution alone (forward + backward), pallas, 131k tokens, as JSON:
  python -m hyena_jax.aot --config=configs/1m.py --target=v5e-1 --kernel_only --json \
      --config.model.conv_impl=pallas --seq_len=131072
  # on this host's own devices (an XLA:CPU plan, not an accelerator's):
  python -m hyena_jax.aot --config=configs/1m.py --devices=8 --platform=cpu
Targets: TPU slices (v4-8, v5e-4, v5p-8, v6e-8, ... or a topology such as v5p:2x2x2) and GPUs
(h100, h200, h100x8, h200x8); an unknown name lists the known ones. By default the last
(longest) stage is compiled; --stage picks another, --seq_len overrides its length (l_max is
raised to match). GPU compiles run ptxas on every kernel: minutes per kernel at long lengths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from hyena_jax import errors
from hyena_jax.training import memory, roofline
from hyena_jax.training import run as run_lib
from hyena_jax.training import sharding, steps
from hyena_jax.training.memory import GIB


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target: `platform` 'tpu' or 'cuda', its topology, and per-chip HBM in GiB."""
  name: str
  platform: str
  topology: str
  hbm_gib: float
  gpu_config: str = ""     # file in hyena_jax/gpu_targets/ (GPU only)


# Per-chip HBM of each TPU generation (Google Cloud TPU documentation).
TPU_HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
_GPU_CONFIGS = {"h100": "h100_sxm.txtpb", "h200": "h200_sxm.txtpb"}


def _gpu_target(name: str, chip: str, count: int) -> Target:
  text = _gpu_config_text(_GPU_CONFIGS[chip])
  hbm = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1)) / GIB
  return Target(name, "cuda", f"1x1x{count}", round(hbm, 2), _GPU_CONFIGS[chip])


def _known_targets() -> dict[str, Target]:
  tpu = {
      # Cloud names: v4 and v5p count TensorCores (2 per chip), v5e and v6e count chips.
      "v4-8": ("v4", "2x2x1"), "v4-16": ("v4", "2x2x2"), "v4-32": ("v4", "2x2x4"),
      "v5e-1": ("v5e", "1x1"), "v5e-4": ("v5e", "2x2"), "v5e-8": ("v5e", "2x4"),
      "v5e-16": ("v5e", "4x4"),
      "v5p-2": ("v5p", "1x1x1"), "v5p-8": ("v5p", "2x2x1"), "v5p-16": ("v5p", "2x2x2"),
      "v5p-32": ("v5p", "2x2x4"),
      "v6e-1": ("v6e", "1x1"), "v6e-4": ("v6e", "2x2"), "v6e-8": ("v6e", "2x4"),
  }
  targets = {name: Target(name, "tpu", f"{gen}:{topo}", TPU_HBM_GIB[gen])
             for name, (gen, topo) in tpu.items()}
  for chip in _GPU_CONFIGS:
    for count in (1, 8):
      name = chip if count == 1 else f"{chip}x{count}"
      targets[name] = functools.partial(_gpu_target, name, chip, count)
  return targets


def get_target(name: str) -> Target:
  """A known name (`v5e-4`, `v5p-8`, `h100`, `h200x8`, ...) or a TPU topology such as
  `v5p:2x2x2` / `v6e:4x4`."""
  targets = _known_targets()
  if name in targets:
    t = targets[name]
    return t() if callable(t) else t
  gen, _, topo = name.partition(":")
  if gen in TPU_HBM_GIB and re.fullmatch(r"\d+(x\d+){1,2}", topo):
    return Target(name, "tpu", name, TPU_HBM_GIB[gen])
  raise errors.InputError(
      f"unknown target {name!r}; known: {', '.join(targets)}, or a TPU topology "
      f"'<{'|'.join(TPU_HBM_GIB)}>:AxB[xC]' such as v5p:2x2x2")


def _gpu_config_text(filename: str) -> str:
  return importlib.resources.files("hyena_jax").joinpath("gpu_targets", filename).read_text()


# What libtpu prints when it starts on a host that is not a TPU VM: true, and beside the point for a
# deviceless compile (setting TPU_ACCELERATOR_TYPE would silence it, and change the host bounds
# libtpu assumes for multi-chip topologies).
_LIBTPU_HOST_NOTICE = "could not determine TPU accelerator type"


@contextlib.contextmanager
def _without_libtpu_host_notice():
  """Runs the block with file descriptor 2 captured, then writes back what was printed there
  except libtpu's notice (C++ writes to the descriptor, not to sys.stderr)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
              if _LIBTPU_HOST_NOTICE not in line]
      sys.stderr.write("".join(kept))
      sys.stderr.flush()


def target_devices(target: Target) -> list:
  """The target's devices as the deviceless compiler describes them (no hardware needed)."""
  from jax.experimental import topologies
  if target.platform == "tpu":
    chips = math.prod(int(x) for x in target.topology.partition(":")[2].split("x"))
    # A single chip is a host of its own (the default host is 2x2 chips).
    kwargs = {"chips_per_host_bounds": [1, 1, 1]} if chips == 1 else {}
    try:
      with _without_libtpu_host_notice():
        return list(topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                  **kwargs).devices)
    except Exception as e:  # libtpu missing or not loadable: say how to get it
      raise errors.InputError(
          f"cannot describe TPU topology {target.topology!r} ({type(e).__name__}: {e}); install "
          "libtpu with `pip install -e .[tpu]` and run with JAX_PLATFORMS=cpu "
          "TPU_SKIP_MDS_QUERY=1") from e
  try:
    return list(topologies.get_topology_desc(
        platform="cuda", target_config=_gpu_config_text(target.gpu_config),
        topology=target.topology).devices)
  except Exception as e:
    raise errors.InputError(
        f"cannot describe GPU target {target.name!r} ({type(e).__name__}: {e}); install the "
        "CUDA plugin with `pip install -e .[cuda12]`") from e


def lower_train_step(config: ml_collections.ConfigDict, *, stage: int = -1,
                     devices: list | None = None):
  """Lowers stage `stage`'s train step on abstract, sharded inputs; returns jax's Lowered."""
  run = run_lib.build_run(config, devices=devices)
  _, seq_len, accum = config.train.stages[stage]
  batch_sharding = sharding.batch_sharding(run.mesh)
  batch = {k: jax.ShapeDtypeStruct((config.train.global_batch_size, seq_len), dtype,
                                   sharding=batch_sharding)
           for k, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                            ("loss_mask", jnp.float32))}
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       run.abstract_state, run.state_shardings)
  step = jax.jit(steps.make_train_step(run.graphdef, run.tx, run.schedule, grad_accum=accum,
                                       seed=config.train.seed, forward=run.forward),
                 in_shardings=(run.state_shardings, batch_sharding),
                 out_shardings=(run.state_shardings, None), donate_argnums=0)
  # The mesh in context tells custom kernels (pallas_conv) the target devices and the axes to
  # shard_map over.
  with jax.set_mesh(run.mesh):
    return step.lower(state, batch)


def lower_long_conv(config: ml_collections.ConfigDict, *, stage: int = -1,
                    devices: list | None = None):
  """Lowers one layer's long convolution alone, forward and backward, as the train step runs it:
  [micro-batch, d_model, seq_len] in the compute dtype, the filter in float32, batch sharded over
  the (data, fsdp) mesh of `devices`."""
  from hyena_jax.model import fftconv
  run = run_lib.build_run(config, devices=devices)
  _, seq_len, accum = config.train.stages[stage]
  batch, d = config.train.global_batch_size // accum, config.model.d_model
  dtype = jnp.dtype(config.model.dtype)
  batch_sharding = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec(
      sharding.BATCH_AXES))
  replicated = sharding.replicated(run.mesh)

  def loss(u, k, d_bias, gate):  # through the model's own dispatch
    conv = fftconv.long_conv(u, k, d_bias, gate, impl=config.model.conv_impl,
                             pallas_spectra_dtype=config.model.pallas_spectra_dtype)
    return jnp.sum(conv.astype(jnp.float32))

  args = (jax.ShapeDtypeStruct((batch, d, seq_len), dtype, sharding=batch_sharding),
          jax.ShapeDtypeStruct((d, seq_len), jnp.float32, sharding=replicated),
          jax.ShapeDtypeStruct((d,), jnp.float32, sharding=replicated),
          jax.ShapeDtypeStruct((batch, d, seq_len), dtype, sharding=batch_sharding))
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  with jax.set_mesh(run.mesh):
    return step.lower(*args)


# Custom calls that custom kernels compile to, by kind, as they appear in compiled HLO text.
_KERNEL_MARKERS = {"mosaic": 'custom_call_target="tpu_custom_call"',
                   "triton": 'custom_call_target="__gpu$xla.gpu.triton"'}


def custom_kernels(hlo_text: str) -> dict[str, int]:
  """How many Mosaic (TPU Pallas) and Triton (GPU Pallas) kernel calls an HLO text holds."""
  return {kind: hlo_text.count(marker) for kind, marker in _KERNEL_MARKERS.items()}


def fit_advice(peak_gib: float, hbm_gib: float, config: ml_collections.ConfigDict,
               devices: int = 1, stage: int = -1) -> str:
  """'' when `peak_gib` fits in `hbm_gib`; otherwise by how much it does not, and what to try
  (only what applies: no grad_accum when a device already sees one sequence per micro-batch,
  no context parallelism on one device)."""
  if peak_gib <= hbm_gib:
    return ""
  tips = []
  if config.model.remat == "none":
    tips.append("model.remat='block' (recompute each block in the backward)")
  if not config.model.scan_layers:
    tips.append("model.scan_layers=True (one block's temporaries live at a time)")
  if config.model.remat != "offload":
    tips.append("model.remat='offload' with scan_layers=True (block inputs in host memory)")
  if devices > 1:
    tips.append("context parallelism (mesh.sequence > 1 splits each sequence over devices)")
  _, _, accum = config.train.stages[stage]
  data, fsdp, sequence = config.mesh.data, config.mesh.fsdp, config.mesh.sequence
  batch_split = devices // max(1, sequence) if -1 in (data, fsdp) else data * fsdp
  if config.train.global_batch_size // accum // batch_split > 1:
    tips.append("a larger grad_accum in train.stages (fewer sequences per micro-batch)")
  if not tips:
    tips.append("more devices with context parallelism, or a shorter sequence")
  return (f"needs {peak_gib - hbm_gib:.1f} GiB more than the {hbm_gib:g} GiB of HBM per chip; "
          "try " + ", or ".join(tips))


def peak_of(target: Target) -> roofline.Peak:
  """The datasheet peaks of the target's chip (`roofline.PEAKS`)."""
  chip = target.name.split("x")[0] if target.platform == "cuda" else \
      target.topology.partition(":")[0]
  return roofline.PEAKS[chip]


def roofline_report(hlo_text: str, target: Target, config: ml_collections.ConfigDict,
                    stage: int, kernel_only: bool, devices: int) -> dict[str, Any]:
  """Per device: the compiled program's flops and HBM bytes (loops counted), the bound
  max(flops / peak, bytes / bandwidth) on its step time, and the tokens/s of all devices."""
  _, seq_len, accum = config.train.stages[stage]
  batch = config.train.global_batch_size // (accum if kernel_only else 1)
  peak = peak_of(target)
  if target.platform == "tpu":   # a compile-only v4 device is one TensorCore of a 2-core chip
    chips = math.prod(int(x) for x in target.topology.partition(":")[2].split("x"))
    share = chips / devices
    peak = dataclasses.replace(peak, bf16_flops=peak.bf16_flops * share,
                               hbm_bytes_per_s=peak.hbm_bytes_per_s * share)
  cost = roofline.program_cost(hlo_text)
  bound = roofline.roofline(cost, peak, tokens=batch * seq_len // devices)
  bound["tokens_per_s"] *= devices
  return {f"roofline_{k}" if k in ("bound", "peaks") else k: v for k, v in bound.items()} | {
      "loops_counted": cost.loops, "loops_unknown": cost.unknown_loops}


def _gib(number: str, unit: str) -> float:
  return float(number) / {"K": 2 ** 20, "M": 2 ** 10, "G": 1}[unit]


def check_compiler(target: Target) -> None:
  """Raises InputError, saying what to install, when the target's compiler is missing."""
  package, extra = ("libtpu", "tpu") if target.platform == "tpu" else ("jax_cuda12_plugin",
                                                                       "cuda12")
  if importlib.util.find_spec(package) is None:
    raise errors.InputError(
        f"target {target.name} needs its compiler ({package}), which is not installed: "
        f'pip install -e ".[{extra}]"')


def compile_for_target(config: ml_collections.ConfigDict, target: Target | str, *,
                       stage: int = -1, kernel_only: bool = False) -> dict[str, Any]:
  """Compiles the stage's train step (or, with `kernel_only`, one long convolution) for `target`
  with the real compiler, deviceless. Never raises for a compiler error: the report says it."""
  target = get_target(target) if isinstance(target, str) else target
  _, seq_len, accum = config.train.stages[stage]
  report: dict[str, Any] = {
      "target": target.name, "topology": target.topology, "what": "long_conv" if kernel_only
      else "train_step", "seq_len": seq_len, "global_batch_size":
      config.train.global_batch_size, "grad_accum": accum, "conv_impl": conv_label(config),
      "remat": config.model.remat, "scan_layers": config.model.scan_layers,
      "dtype": config.model.dtype, "hbm_gib": target.hbm_gib}
  devices = target_devices(target)
  report["devices"] = len(devices)
  if target.platform == "tpu":
    # Compile-only v4 topologies expose each TensorCore as a device (no megacore): HBM per
    # device is the chip's divided among its devices.
    chips = math.prod(int(x) for x in target.topology.partition(":")[2].split("x"))
    target = dataclasses.replace(target, hbm_gib=target.hbm_gib * chips / len(devices))
    report["hbm_gib"] = target.hbm_gib
  start = time.perf_counter()
  try:
    lower = lower_long_conv if kernel_only else lower_train_step
    compiled = lower(config, stage=stage, devices=devices).compile()
  except errors.InputError:
    raise
  except Exception as e:  # the compiler's verdict is the result, e.g. a Mosaic/ptxas rejection
    report.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                  compile_s=round(time.perf_counter() - start, 1))
    # The TPU compiler refuses programs over HBM, naming what the temporaries need: a lower
    # bound on the peak, so the report can still say by how much it does not fit.
    oom = re.search(r"temporaries \(([\d.]+)([KMG])\) exceeds available HBM", str(e))
    available = re.search(r"exceeds available HBM \(([\d.]+)([KMG])\)", str(e))
    if available:   # the compiler's own figure (15.75 GiB on a v5e, not the datasheet's 16)
      target = dataclasses.replace(target, hbm_gib=_gib(*available.groups()))
      report["hbm_gib"] = target.hbm_gib
    if oom:
      need = _gib(*oom.groups())
      report.update(temp_gib=need, peak_gib_at_least=need, fits=False,
                    advice=fit_advice(need, target.hbm_gib, config, len(devices), stage))
    return report
  report.update(ok=True, compile_s=round(time.perf_counter() - start, 1))
  report.update(memory.in_gib(memory.memory_report(compiled)))
  hlo = compiled.as_text()
  report.update(custom_kernels(hlo))
  report.update(roofline_report(hlo, target, config, stage, kernel_only, len(devices)))
  if "peak_gib" in report:
    report["fits"] = report["peak_gib"] <= target.hbm_gib
    report["advice"] = fit_advice(report["peak_gib"], target.hbm_gib, config, len(devices),
                                  stage)
  return report


TABLE_HEADER = (f"{'target':>9} {'what':>10} {'L':>9} {'conv':>11} {'remat':>5} {'ok':>3} "
                f"{'arg':>6} {'temp':>6} {'peak':>6} {'HBM':>6} {'fits':>4} {'compile_s':>9} "
                f"{'mosaic':>6} {'triton':>6} {'TFLOP':>8} {'GB':>8} {'bound_s':>8} {'tok/s':>9}")


def conv_label(config: ml_collections.ConfigDict) -> str:
  """conv_impl, with '-bf16' when the Pallas kernel stores its spectra in bfloat16."""
  model = config.model
  bf16 = model.conv_impl == "pallas" and model.pallas_spectra_dtype == "bfloat16"
  return model.conv_impl + ("-bf16" if bf16 else "")


def format_row(r: dict[str, Any]) -> str:
  """One report as a table line (plus a line of advice where it does not fit)."""
  if not r.get("ok"):
    line = (f"{r['target']:>9} {r['what']:>10} {r['seq_len']:>9} {r['conv_impl']:>11} "
            f"{r['remat']:>5} {'no':>3}  {r.get('error', '')}")
  else:
    line = (
        f"{r['target']:>9} {r['what']:>10} {r['seq_len']:>9} {r['conv_impl']:>11} "
        f"{r['remat']:>5} {'yes':>3} {r.get('argument_gib', math.nan):>6.2f} "
        f"{r.get('temp_gib', math.nan):>6.2f} {r.get('peak_gib', math.nan):>6.2f} "
        f"{r['hbm_gib']:>6.2f} {('yes' if r.get('fits') else 'NO'):>4} {r['compile_s']:>9.1f} "
        f"{r['mosaic']:>6} {r['triton']:>6} {r.get('flops', math.nan) / 1e12:>8.2f} "
        f"{r.get('bytes', math.nan) / 1e9:>8.1f} {r.get('bound_s', math.nan):>8.4f} "
        f"{r.get('tokens_per_s', math.nan):>9.3g}")
  return line + (f"\n{'':>9} {r['advice']}" if r.get("advice") else "")


def format_table(reports: list[dict[str, Any]]) -> str:
  """One line per report: target, length, settings, verdict, GiB, compile seconds, kernels,
  and the roofline columns (per device: TFLOP and GB of HBM traffic per step, the bound on the
  step time; tokens/s of all devices)."""
  return "\n".join([TABLE_HEADER] + [format_row(r) for r in reports])


def compile_train_step(config: ml_collections.ConfigDict, *, stage: int = -1,
                       devices: list | None = None, lower_only: bool = False) -> dict[str, Any]:
  """Compiles the step on `devices` (default: this host's) and reports memory per device, GiB."""
  lowered = lower_train_step(config, stage=stage, devices=devices)
  _, seq_len, accum = config.train.stages[stage]
  report: dict[str, Any] = {
      "devices": len(devices) if devices is not None else jax.device_count(),
      "seq_len": seq_len, "global_batch_size": config.train.global_batch_size,
      "grad_accum": accum, "dtype": config.model.dtype, "remat": config.model.remat}
  if lower_only:
    return report
  report.update(memory.in_gib(memory.memory_report(lowered.compile())))
  return report


# ------------------------------------------------------------------------------------------------
# Command line
