"""What every command-line tool shares: one answer to the user's mistakes, and quiet logs.

`run(main)` replaces `absl.app.run(main)` in main, finetune, icl, convert, export, embed, score
and generate:
  * an expected error (`errors.InputError`, a flag that does not parse, a config override that
    names no field) prints ONE line on stderr, `error: <what, where, the fix>`, and exits 2;
  * any other exception is a bug and keeps its traceback;
  * libraries' INFO chatter (orbax logs every file it writes; jax logs the backends it could not
    start, e.g. libtpu on a CPU machine) is dropped, their warnings kept.

Every tool also keeps JAX's persistent compilation cache (`enable_compilation_cache`): a rerun
loads the programs it compiled before (the train step, the forward per length bucket, the
initialisers) instead of compiling them again.

Config files are defined with `define_config_file`, which answers an unknown override such as
`--config.train.foo=1` with the fields that exist and a "did you mean", and adds --print_config
(print the resolved config and exit 0; --help points at it). `define_config_alias` gives a field
a short flag (finetune and icl: --model for --config.pretrained).
"""

from __future__ import annotations

import ast
import difflib
import logging as py_logging
import os
import runpy
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging

from hyena_jax import cpu_runtime, errors

EXIT_INPUT_ERROR = 2


def one_line(message: Any) -> str:
  """A (possibly multi-line, bulleted) message as one line: later lines joined with '; '."""
  lines = [line.strip() for line in str(message).splitlines()]
  lines = [line[2:] if line.startswith("- ") else line for line in lines]  # bullets
  lines = [line for line in lines if line]
  if not lines:
    return type(message).__name__ if isinstance(message, BaseException) else "unknown error"
  head, rest = lines[0], lines[1:]
  if not rest:
    return head
  return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


def fail(message: Any) -> NoReturn:
  """Prints `error: <message>` as one line on stderr and exits with status 2."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_INPUT_ERROR)


class _QuietLibraries(py_logging.Filter):
  """Drops INFO (and lower) records of orbax, gcsfs and jax's backend probing; keeps their
  warnings."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    from_orbax = "/orbax/" in record.pathname or record.name.startswith("orbax")
    if from_orbax and record.exc_info and errors.is_storage_failure(record.exc_info[1]):
      return False  # a failed background save: train reports it as one `error:` line
    if from_orbax and record.exc_info and _lost_a_peer(record.exc_info[1]):
      return False  # its barrier lost a peer: main reports it as one `error:` line
    if record.levelno >= py_logging.WARNING:
      return True
    if "/orbax/" in record.pathname or record.name.startswith(("orbax", "gcsfs", "fsspec")):
      return False
    # "Unable to initialize backend 'tpu': ... libtpu.so ..." on every start of a non-TPU machine.
    return not (record.name == "jax._src.xla_bridge"
                and str(record.msg).startswith("Unable to initialize backend"))


def _lost_a_peer(error: BaseException | None) -> bool:
  from hyena_jax.training import distributed  # pylint: disable=g-import-not-at-top
  return error is not None and distributed.lost_a_peer(error)


_FILTER = _QuietLibraries()


def quiet_logs() -> None:
  """Installs the library filter on absl's handler and the root logger's handlers, and keeps a
  background thread's OSError (a TensorBoard writer on a full disk) to one debug line: the
  main thread meets the same error and reports it (idempotent)."""
  handlers = [logging.get_absl_handler()] + list(py_logging.getLogger().handlers)
  for handler in handlers:
    if _FILTER not in handler.filters:
      handler.addFilter(_FILTER)
  if threading.excepthook is not _thread_excepthook:
    _default_thread_excepthook[0] = threading.excepthook
    threading.excepthook = _thread_excepthook


_default_thread_excepthook: list[Callable[..., Any]] = [threading.excepthook]


def _thread_excepthook(args: Any) -> None:
  # A failed background save, or a background save's barrier that lost a peer (orbax's commit
  # thread, when another process of the run is killed): the main thread meets the same failure
  # and reports it in one line.
  if args.exc_value is not None and (errors.is_storage_failure(args.exc_value)
                                     or _lost_a_peer(args.exc_value)):
    logging.debug("background thread %s stopped: %s", getattr(args.thread, "name", "?"),
                  args.exc_value)
    return
  _default_thread_excepthook[0](args)


# ------------------------------------------------------------------------------------------------
# Config files with overrides


_CONFIG_FLAGS: list[tuple[str, str | None]] = []  # (flag name, default file) of this program
_ALIASES: list[tuple[str, str, str]] = []  # (flag, config flag, field path): --model -> pretrained
_REQUIRED: list[str] = []  # flags checked after --print_config (which needs none but the config)


def define_config_file(name: str, default: str | None, help_string: str) -> Any:
  """`config_flags.DEFINE_config_file(..., lock_config=True)`, answering a bad override in one
  line. With a default, ml_collections reads the file and the `--name.a.b=v` overrides of
  sys.argv right here, at definition; without one, during flag parsing (see `run`).

  Also defines --print_config: print the resolved config (every field, with the overrides and
  aliases applied) and exit 0, because --help cannot list the fields of a file it has not read."""
  from ml_collections import config_flags
  _CONFIG_FLAGS.append((name, default))
  if "print_config" not in flags.FLAGS:
    flags.DEFINE_bool("print_config", False, "Print the resolved config (every field and its "
                      "value, overrides applied) and exit; run with --config=... to see a "
                      "config's fields and defaults.")
  help_string = (help_string.rstrip(". ") + f". Override any field with --{name}.FIELD=VALUE; "
                 "--print_config lists the fields and their values")
  # With a default, ml_collections runs the file now: answer a broken file or a repeated
  # override before it does.
  message = _config_file_error(name, _flag_value(sys.argv, name) or default or "")
  message = message or _repeated_override(sys.argv)
  if message:
    fail(message)
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (KeyError, AttributeError):
    message = _override_error(sys.argv)
    if message is None:
      raise
    fail(message)


def _override_error(argv: Sequence[str]) -> str | None:
  """The message for the first `--<config>.path=value` of argv that names no config field, or
  None when every override path exists (then the error at hand is not about overrides)."""
  for name, default in _CONFIG_FLAGS:
    spec = _flag_value(argv, name) or default
    overrides = _override_paths(argv, name)
    if not overrides or not spec:
      continue
    try:
      config = _load_config(spec)
    except Exception:  # the config file itself is broken: let the original error speak
      return None
    for arg, path in overrides:
      message = _missing_field(config, path)
      if message:
        return f"{arg}: {message}"
  return None


def _repeated_override(argv: Sequence[str]) -> str | None:
  """The message for a `--<config>.path` given twice (ml_collections would join two tuples and
  keep the last of two scalars: neither is what a user who repeated it by accident expects)."""
  for name, _ in _CONFIG_FLAGS:
    seen = set()
    for flag, path in _override_paths(argv, name):
      if path in seen:
        return f"{flag} is given twice; give each config field once"
      seen.add(path)
  return None


def _config_file_error(name: str, spec: str) -> str | None:
  """Why the config file of `--name=path[:arg]` cannot be used (missing, a syntax error with its
  line, no get_config), or None."""
  if not spec:
    return None
  path = os.path.expanduser(spec.partition(":")[0])
  if not os.path.isfile(path):
    return (f"--{name}={spec}: no such config file; give the path of a config .py file (e.g. "
            "configs/default.py), relative to the current folder or absolute")
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
  except SyntaxError as e:
    return f"{path}:{e.lineno}: {e.msg} (a syntax error in the config file)"
  except (OSError, UnicodeDecodeError) as e:
    return f"--{name}={spec}: cannot read the config file: {e}"
  defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
  defined |= {target.id for node in tree.body if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Name)}
  defined |= {alias.asname or alias.name for node in tree.body
              if isinstance(node, ast.ImportFrom) for alias in node.names}
  if "get_config" not in defined:
    return (f"{path} defines no get_config(): a config file returns its ConfigDict from a "
            "function get_config()")
  return None


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _override_paths(argv: Sequence[str], name: str) -> list[tuple[str, str]]:
  out = []
  for arg in argv:
    if arg.startswith(f"--{name}.") or arg.startswith(f"--no{name}."):
      flag = arg.split("=", 1)[0]
      path = flag.split(".", 1)[1]
      out.append((flag, path))
  return out


def _load_config(spec: str) -> Any:
  """get_config() of a config file `path[:arg]`, as ml_collections would call it."""
  path, _, arg = spec.partition(":")
  get_config = runpy.run_path(os.path.expanduser(path))["get_config"]
  return get_config(arg) if arg else get_config()


def _missing_field(config: Any, path: str) -> str | None:
  """Why `path` (a.b.c) names no field of `config`, with a "did you mean", or None if it does."""
  node, done = config, []
  for part in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else None
    if keys is None:
      return (f"{'.'.join(done)} is a {type(node).__name__}, not a section; it has no field "
              f"{part!r}")
    if part not in keys:
      where = ".".join(done) or "the config"
      guess = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
      hint = f" (did you mean {'.'.join(done + guess)}?)" if guess else ""
      return f"{where} has no field {part!r}{hint}; {where} has: {', '.join(sorted(keys))}"
    node, done = node[part], done + [part]
  return None


def _check_config_files() -> None:
  """ml_collections defers a config file that failed to load until its first use (a long way
  into main); a missing file is the user's mistake, so answer it here."""
  for name, _ in _CONFIG_FLAGS:
    if not flags.FLAGS[name].present and flags.FLAGS[name].default is None:
      continue  # not given: a required flag, answered after --print_config
    spec = flags.FLAGS[name].config_filename if hasattr(flags.FLAGS[name], "config_filename") \
        else None
    message = _config_file_error(name, spec or "")
    if message:
      fail(message)


def define_config_alias(flag: str, config: str, path: str, help_string: str) -> None:
  """Defines string flag --`flag` as a short name for --`config`.`path` (e.g. --model for
  --config.pretrained); giving both with different values is a usage error."""
  flags.DEFINE_string(flag, None, f"{help_string} (sets --{config}.{path})")
  _ALIASES.append((flag, config, path))


def mark_required(names: Sequence[str]) -> None:
  """`flags.mark_flags_as_required`, checked in `run` after --print_config (so that printing a
  config needs no --workdir)."""
  _REQUIRED.extend(names)


def _apply_aliases(argv: Sequence[str]) -> None:
  for flag, config_name, path in _ALIASES:
    value = flags.FLAGS[flag].value
    if value is None:
      continue
    config = flags.FLAGS[config_name].value
    if config is None:  # no --config: the required-flag check answers that
      continue
    *parents, leaf = path.split(".")
    for part in parents:
      config = config[part]
    if any(p == path for _, p in _override_paths(argv, config_name)) and config[leaf] != value:
      raise app.UsageError(f"--{flag}={value} and --{config_name}.{path}={config[leaf]} disagree: "
                           f"pass only one (--{flag} is short for --{config_name}.{path})")
    config[leaf] = value


def _print_config_or_check_required(argv: Sequence[str]) -> None:
  """--print_config: print each config (aliases applied) and exit 0; else the required flags."""
  f = flags.FLAGS
  if "print_config" in f and f.print_config:
    for name, _ in _CONFIG_FLAGS:
      if f[name].value is None:
        raise app.UsageError(f"--print_config needs --{name}=PATH_OF_A_CONFIG_FILE")
      sys.stdout.write(f"# --{name}\n{f[name].value}")
    sys.stdout.flush()
    sys.exit(0)
  for name in _REQUIRED:
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required; see --help")


# ------------------------------------------------------------------------------------------------
# Running a main


_HELP_FLAGS = ("-?", "-h", "-help", "--help", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
  message = _repeated_override(argv)
  if message:
    fail(message)
  for name, _ in _CONFIG_FLAGS:  # a config given as a flag is run during parsing
    message = _config_file_error(name, _flag_value(argv, name) or "")
    if message:
      fail(message)
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl exits 1 after printing --help; asking for help is no failure
    if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    message = str(e)
    if "Traceback (most recent call last)" in message:  # a config file's get_config() raised
      head, _, trace = message.partition("Traceback (most recent call last)")
      message = head.rstrip(": \n") + ": " + trace.strip().splitlines()[-1]
    fail(f"{message}; see --help")
  except (KeyError, AttributeError):  # a config override naming no field
    message = _override_error(argv)
    if message is None:
      raise
    fail(message)


COMPILATION_CACHE_ENV = "HYENA_JAX_COMPILATION_CACHE"
_OFF = ("0", "false", "no", "off")


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache for this process; returns its folder (None: off).

  Where: $HYENA_JAX_COMPILATION_CACHE (a folder, or 0 to turn it off), else JAX's own
  $JAX_COMPILATION_CACHE_DIR, else `data.cache_dir()`/xla (~/.cache/hyena_jax/xla). Every
  compiled program is kept, however quick its compile: on a 2-core CPU, `hyena_jax.embed` with
  tiny-1k spends about 2.5 s compiling the initialisers and 1 s per length bucket, which a
  rerun loads instead. Entries are keyed by the program, the JAX version and the XLA flags, so
  a stale entry is never used; deleting the folder is always safe. Only the command-line tools
  call this: importing `hyena_jax` as a library writes nothing to disk.
  """
  setting = os.environ.get(COMPILATION_CACHE_ENV, "").strip()
  if setting.lower() in _OFF:
    return None
  import jax  # pylint: disable=g-import-not-at-top

  from hyena_jax.data import pretraining as data  # pylint: disable=g-import-not-at-top
  path = setting or jax.config.jax_compilation_cache_dir or str(data.cache_dir() / "xla")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return path


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` with quiet library logs, one-line answers to input errors (exit 2) and
  the persistent compilation cache."""
  def wrapped(argv: list[str]) -> Any:
    cpu_runtime.configure()  # before the first computation creates JAX's CPU backend
    quiet_logs()
    enable_compilation_cache()
    _check_config_files()
    try:
      _apply_aliases(sys.argv)
      _print_config_or_check_required(sys.argv)
      return main(argv)
    except (errors.InputError, app.UsageError) as e:
      fail(e)
  app.run(wrapped, flags_parser=_parse_flags)
