"""Test setup: 8 fake CPU devices for sharding tests, fixtures from $HYENA_JAX_SHARED."""

import os
import pathlib

# Must precede the first `import jax` anywhere in the test session.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=-reduce")

from hyena_jax import cpu_runtime  # noqa: E402

cpu_runtime.configure()  # as the command-line tools do (malloc settings; the flag is set above)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tests build the same small programs many times (every training run compiles its steps anew):
# a persistent compilation cache for the session turns repeats into cache hits.
# Kept per checkout, in pytest's own cache folder (ignored by git), so that a fresh clone runs
# cold and two checkouts on one machine never share entries.
_CACHE = os.environ.get("HYENA_JAX_TEST_COMPILE_CACHE", str(
    pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "xla_compile_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Command-line tools run in subprocesses keep their programs there too, not in ~/.cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)

SHARED = pathlib.Path(os.environ.get(
    "HYENA_JAX_SHARED", pathlib.Path(__file__).resolve().parents[1].parent / "shared"))


def shared_path(*parts: str) -> pathlib.Path:
  """Path under the shared folder; skips the test with the reason when it is absent."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} not found: set HYENA_JAX_SHARED to the folder holding parity/ and data/ "
                "(the golden fixtures are not part of a fresh clone)")
  return path


@pytest.fixture
def shared():
  return shared_path


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  """The uninterrupted multi-process rehearsal runs on local disk (cluster.py): ROOT/one (1 process
  x 4 devices) and ROOT/two (2 processes x 2 devices), the references of test_multihost and
  test_gcs."""
  import cluster  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("multihost")
  times = {"one": cluster.run(root / "one", root / "one.log", 1, 4),
           "two": cluster.run(root / "two", root / "two.log", 2, 2)}
  print(f"\nwall time of the uninterrupted run: 1 process x 4 devices {times['one']:.1f} s, "
        f"2 processes x 2 devices {times['two']:.1f} s")
  return root


@pytest.fixture(scope="session")
def promoters():
  """Balanced real rows of GenomicBenchmarks human_nontata_promoters (251 bp)."""
  path = shared_path("data", "genomic_benchmarks", "human_nontata_promoters.test.tsv")
  rows = [line.rstrip("\n").split("\t") for line in open(path)][1:]
  rng = np.random.default_rng(0)
  picked = []
  for label in ("0", "1"):
    cls = [r for r in rows if r[1] == label]
    picked += [cls[i] for i in rng.choice(len(cls), 40, replace=False)]
  return [picked[i] for i in rng.permutation(len(picked))]
