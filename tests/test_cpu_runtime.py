"""hyena_jax.cpu_runtime: the process-wide CPU settings the tools apply (and hyena_jax.configure_cpu()),
never an import."""

import json
import os
import subprocess
import sys

import pytest

from hyena_jax import cpu_runtime

YNN = "--xla_cpu_experimental_ynn_fusion_type"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_xla_flags_are_added_and_the_users_own_kept():
  assert cpu_runtime.with_xla_cpu_flags("") == f"{YNN}=-reduce"
  devices = "--xla_force_host_platform_device_count=8"
  assert cpu_runtime.with_xla_cpu_flags(devices) == f"{devices} {YNN}=-reduce"
  # A user's own choice of the same flag wins, and nothing is added twice.
  assert cpu_runtime.with_xla_cpu_flags(f"{YNN}=dot {devices}") == f"{YNN}=dot {devices}"
  once = cpu_runtime.with_xla_cpu_flags(devices)
  assert cpu_runtime.with_xla_cpu_flags(once) == once


def _child(code: str, **env) -> dict:
  full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",
                                                               "HYENA_JAX_CPU_TUNING")}
  full_env.update(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                       text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


_IMPORT = ("import os, json, hyena_jax, hyena_jax.embed; "
           "print(json.dumps({'flags': os.environ.get('XLA_FLAGS')}))")
_FLAGS = ("import os, json, hyena_jax; hyena_jax.configure_cpu(); "
          "print(json.dumps({'flags': os.environ.get('XLA_FLAGS')}))")


def test_importing_changes_nothing_and_configure_cpu_sets_the_flags_unless_disabled():
  assert _child(_IMPORT)["flags"] is None  # not even importing a command-line tool's module
  assert _child(_FLAGS)["flags"] == f"{YNN}=-reduce"
  assert _child(_FLAGS, XLA_FLAGS="--xla_dump_to=/tmp/x")["flags"] == (
      f"--xla_dump_to=/tmp/x {YNN}=-reduce")
  assert _child(_FLAGS, HYENA_JAX_CPU_TUNING="0")["flags"] is None


# A jitted call whose temporaries (a 32 MiB complex spectrum) exceed glibc's largest mmap
# threshold: the fewest page faults of five calls after ten (the heap settles within a few).
_FAULTS = """
import json, resource, hyena_jax
applied = hyena_jax.configure_cpu()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.abs(jnp.fft.rfft(x)).sum())
x = jnp.ones((64, 131072), jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(10):
  jax.block_until_ready(f(x))
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(faults)
print(json.dumps({"temp": temp, "faults": faults,
                  "applied": applied}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_warm_calls_reuse_their_temporaries_instead_of_page_faulting_them():
  tuned = _child(_FAULTS)
  if not tuned["applied"].get("malloc"):
    pytest.skip("this libc has no mallopt (not glibc)")
  untuned = _child(_FAULTS, HYENA_JAX_CPU_TUNING="0")
  pages = tuned["temp"] // 4096
  assert tuned["temp"] >= 32 << 20
  # Untuned, glibc mmaps the block afresh and every page of it faults on each call; tuned, the
  # freed block is reused.
  assert untuned["faults"] > pages // 2, untuned
  assert tuned["faults"] < pages // 20, tuned
