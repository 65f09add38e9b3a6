"""The command-line tools' persistent compilation cache (`cli.enable_compilation_cache`)."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# A tool's start-up as `cli.run` does it, then one jitted program.
_PROGRAM = """
from hyena_jax import cli
import jax, jax.numpy as jnp
print("cache:", cli.enable_compilation_cache())
print("jax:", jax.config.jax_compilation_cache_dir)
print(float(jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.arange(4.0)).sum()))
"""


def _run(env_updates: dict, tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "HYENA_JAX_COMPILATION_CACHE", "JAX_LOG_COMPILES")}
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"),
             **env_updates)
  env.pop("HYENA_JAX_CACHE", None)
  result = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return result


def _entries(folder: pathlib.Path) -> list:
  return sorted(p.name for p in folder.glob("*-cache")) if folder.exists() else []


def test_a_rerun_loads_the_program_compiled_by_the_first_run(tmp_path):
  cache = tmp_path / "xla"
  first = _run({"HYENA_JAX_COMPILATION_CACHE": str(cache)}, tmp_path)
  assert f"cache: {cache}" in first.stdout and f"jax: {cache}" in first.stdout
  written = [name for name in _entries(cache) if name.startswith("jit__lambda")]
  assert len(written) == 1, _entries(cache)   # kept although it compiles in milliseconds
  second = _run({"HYENA_JAX_COMPILATION_CACHE": str(cache), "JAX_LOG_COMPILES": "1"}, tmp_path)
  assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr, second.stderr
  assert second.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
  assert written[0] in _entries(cache)


def test_default_folder_is_under_the_user_cache_and_jax_setting_is_honoured(tmp_path):
  default = _run({}, tmp_path)
  expected = tmp_path / "xdg" / "hyena_jax" / "xla"
  assert f"cache: {expected}" in default.stdout
  assert any(name.startswith("jit__lambda") for name in _entries(expected))
  jax_own = tmp_path / "jax_own"
  honoured = _run({"JAX_COMPILATION_CACHE_DIR": str(jax_own)}, tmp_path)
  assert f"cache: {jax_own}" in honoured.stdout
  assert any(name.startswith("jit__lambda") for name in _entries(jax_own))


def test_zero_turns_it_off(tmp_path):
  off = _run({"HYENA_JAX_COMPILATION_CACHE": "0"}, tmp_path)
  assert "cache: None" in off.stdout and "jax: None" in off.stdout
  assert not (tmp_path / "xdg").exists()
