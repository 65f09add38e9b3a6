"""Process-wide CPU settings: `configure()` is called by every command-line tool (`cli.run`) and
by library users who want them (`hyena_jax.configure_cpu()`); importing hyena_jax applies nothing.

XLA:CPU reads its flags when JAX creates the CPU backend (the first computation, not `import
jax`), so `configure()` must run before any JAX computation; later it changes nothing. Set
`HYENA_JAX_CPU_TUNING=0` to leave the process untouched.

1. `XLA_FLAGS` gets `--xla_cpu_experimental_ynn_fusion_type=-reduce` unless it already names a
   YNN fusion type: XLA's YNNPACK reduction fusions made the model's backward several times
   slower (the short filter's weight gradient, a [B*L, C] -> [C] sum, took 73 ms at 8k tokens).
   The user's other flags (e.g. `--xla_force_host_platform_device_count`) are kept.
2. glibc malloc keeps freed memory instead of returning it to the kernel. XLA:CPU allocates each
   call's temporaries (36 MiB at 1k tokens, 289 MiB at 8k for tiny-1k fwd+bwd) as one block;
   glibc serves blocks above 32 MiB (or any size from a worker thread's arena) with a fresh
   mmap, so every call page-faulted and zeroed all of it again: 78k page faults and 0.16 s of
   kernel time per 8k-token step (measured with getrusage). With mmap off for malloc, one arena
   and a high trim threshold, the block is reused: fwd+bwd 41 -> 32 ms at 1k tokens and
   360 -> 300 ms at 8k on 2 cores. The cost: the process keeps its peak heap until it exits.
   Numerics are unchanged. Only on Linux with glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

XLA_CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-reduce",)

# mallopt(3) parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_KEEP_BYTES = 2**31 - 1        # trim threshold: largest value mallopt takes (an int)
_TOP_PAD_BYTES = 64 << 20      # grow the heap in 64 MiB steps

_applied: dict[str, bool] = {}


def tuning_enabled() -> bool:
  return os.environ.get("HYENA_JAX_CPU_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


def with_xla_cpu_flags(xla_flags: str) -> str:
  """`xla_flags` plus XLA_CPU_FLAGS, except those whose setting it already names."""
  flags = xla_flags.split()
  for flag in XLA_CPU_FLAGS:
    name = flag.split("=")[0]
    if not any(f.split("=")[0] == name for f in flags):
      flags.append(flag)
  return " ".join(flags)


def _keep_freed_memory() -> bool:
  """mallopt so that freed blocks stay in the heap for the next call (see the module doc)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_BYTES), (_M_TOP_PAD, _TOP_PAD_BYTES),
      (_M_ARENA_MAX, 1)))


def configure() -> dict[str, bool]:
  """Applies both settings once per process; returns which ones took effect."""
  if _applied or not tuning_enabled():
    return dict(_applied)
  os.environ["XLA_FLAGS"] = with_xla_cpu_flags(os.environ.get("XLA_FLAGS", ""))
  _applied["xla_flags"] = True
  _applied["malloc"] = _keep_freed_memory()
  return dict(_applied)
