"""The train step compiled by the real TPU compiler (libtpu), deviceless, for a 4-chip v5e.

Runs when libtpu is importable (`pip install -e .[tpu]`), otherwise skips saying so. Nothing
executes: the programs are only compiled, with JAX_PLATFORMS=cpu and TPU_SKIP_MDS_QUERY=1 (set
here before libtpu loads; jax's own platform stays the CPU, as the other tests expect).
Each compile takes about a minute on two CPU cores.
"""

import importlib.util
import os
import re

import pytest

if importlib.util.find_spec("libtpu") is None:
  pytest.skip("libtpu is not installed (pip install -e .[tpu]); TPU AOT compiles skipped",
              allow_module_level=True)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu on a non-TPU host
os.environ.setdefault("TPU_WORKER_ID", "0")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip is locked

import jax  # noqa: E402

from hyena_jax.training import aot  # noqa: E402
from hyena_jax.training import memory as memory_lib  # noqa: E402
from hyena_jax.training import run_config

N_LAYER, SEQ_LEN, BATCH = 2, 256, 4


def _tiny_config(conv_impl):
  config = run_config.release_config("tiny-1k")
  config.model.n_layer = N_LAYER
  config.model.conv_impl = conv_impl
  config.train.global_batch_size = BATCH
  config.train.stages = ((10, SEQ_LEN, 1),)
  config.mesh.data, config.mesh.fsdp = 2, 2
  config.eval.batch_size = BATCH
  return config


@pytest.fixture(scope="module")
def v5e_4():
  if jax.default_backend() != "cpu":
    pytest.skip("deviceless TPU compiles need JAX_PLATFORMS=cpu")
  # Deviceless executables cannot be loaded back from the persistent cache (no client), as in
  # `python -m hyena_jax.aot`: without this, every compile warns that it could not read it.
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  yield aot.target_devices(aot.get_target("v5e-4"))
  jax.config.update("jax_enable_compilation_cache", enabled)


@pytest.fixture(scope="module", params=["fft", "pallas"])
def compiled(request, v5e_4):
  config = _tiny_config(request.param)
  lowered = aot.lower_train_step(config, devices=v5e_4)
  return request.param, lowered.compile()


def test_train_step_compiles_for_v5e_with_mosaic_kernels_per_device(compiled):
  conv_impl, executable = compiled
  hlo = executable.as_text()
  kernels = aot.custom_kernels(hlo)
  assert kernels["triton"] == 0
  if conv_impl == "fft":
    assert kernels["mosaic"] == 0
    return
  # remat none: one forward and one backward Mosaic kernel per layer (L=256 is single pass).
  assert kernels["mosaic"] == 2 * N_LAYER, kernels
  # The batch is split over data x fsdp = 4 chips, so each kernel sees 1 sequence, not 4:
  # the forward kernel's output is bf16[1, 128, p/2, q] (tiny-1k: d_model 128).
  shapes = re.findall(r"= (\w+)\[(\d+),128,\d+,\d+\][^\n]*custom_call_target=\"tpu_custom_call\"",
                      hlo)
  assert shapes and {int(b) for _, b in shapes} == {BATCH // 4}, shapes
  memory = memory_lib.in_gib(memory_lib.memory_report(executable))
  assert 0 < memory["peak_gib"] < aot.TPU_HBM_GIB["v5e"]


def test_filter_mlp_matmuls_run_at_highest_precision_on_tpu(compiled):
  """On TPU a default float32 matmul is one bfloat16 pass; the implicit filter's sin(10 W z)
  needs float32 (issue 17). The MLP's hidden activations are the only f32[L, filter_order = 64]
  matmul results in tiny-1k (d_model 128; projections are bfloat16)."""
  conv_impl, executable = compiled
  if conv_impl == "pallas":
    pytest.skip("one conv_impl is enough: the filter MLP does not depend on it")
  hlo = executable.as_text()
  filter_dots = [line for line in hlo.splitlines()
                 if re.search(rf"= f32\[{SEQ_LEN},64\]\{{[^}}]*\}} (dot|convolution)\(", line)]
  assert filter_dots, "the filter MLP's first matmul was not found in the compiled HLO"
  for line in filter_dots:
    assert "operand_precision={highest,highest}" in line, line


def test_the_cost_count_equals_the_tpu_compilers_on_an_unrolled_program(compiled):
  """Without loops, `roofline.program_cost` counts what libtpu's own cost analysis counts (it
  reads the Pallas kernels' cost estimates, which carry the same matmul flops as the metadata
  the counter reads); with the layers scanned, XLA counts one layer and the counter all."""
  from hyena_jax.training import roofline
  conv_impl, executable = compiled     # scan_layers False: no loop in the program
  xla = executable.cost_analysis()
  cost = roofline.program_cost(executable.as_text())
  assert cost.loops == 0
  # The counter runs XLA's generic (CPU) analysis on the TPU program; libtpu's own differs on a
  # few scalar ops (5,410 of 5.0e9 flops with pallas, none with fft).
  assert cost.flops == pytest.approx(xla["flops"], rel=1e-5), (cost.flops, xla["flops"])
  if conv_impl == "pallas":
    assert cost.kernel_flops > 0
  config = _tiny_config(conv_impl)
  config.model.scan_layers, config.model.remat = True, "block"
  scanned = aot.lower_train_step(config, devices=aot.target_devices(aot.get_target("v5e-4")))
  scanned = scanned.compile()
  counted = roofline.program_cost(scanned.as_text())
  assert counted.loops >= 2 and counted.unknown_loops == 0      # forward and backward scans
  assert scanned.cost_analysis()["flops"] < 0.75 * counted.flops
  # remat recomputes each block's forward in the backward: more flops than the unrolled step
  assert counted.flops > cost.flops


def test_a_program_that_does_not_fit_exits_non_zero(tmp_path):
  """`python -m hyena_jax.aot` exits 3 when the compiler refuses a program for want of HBM, and 0
  with --allow_not_fitting; the table row is printed either way."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "hyena_jax.aot", f"--config={root}/configs/default.py",
         "--target=v5e-1", "--config.train.global_batch_size=4096",
         "--config.train.stages=((1,1024,1),)"]
  env = dict(os.environ, PYTHONPATH=root)
  refused = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
  assert refused.returncode == 3, refused.stderr[-2000:]
  assert re.search(r"v5e-1 train_step +1024 +fft +none +no", refused.stdout), refused.stdout
  assert "exceeds available HBM" in refused.stdout
  assert refused.stderr.strip().splitlines()[-1].startswith("error: v5e-1: the program does not")
  # libtpu's notices about the host (not a TPU VM) stay off the screen.
  assert "TPU accelerator type" not in refused.stderr and "INVALID_ARGUMENT" not in refused.stderr
  allowed = subprocess.run(cmd + ["--allow_not_fitting"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=600)
  assert allowed.returncode == 0, allowed.stderr[-2000:]
