"""What users get wrong, and the one-line answer each gets (issue 11's table of bad inputs).

A few cases run the real command line (each costs one interpreter start); the rest call the
function the CLI calls and check the InputError's text. `cli.run` turns every InputError into
`error: <message>` on one stderr line and exit status 2, which the subprocess cases check.
"""

import gzip
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hyena_jax
from hyena_jax import cli
from hyena_jax.data import seqfiles, tokenizer
from hyena_jax.downstream import finetune, finetune_config
from hyena_jax.errors import InputError, MissingDependencyError
from hyena_jax.inference import batching as inference
from hyena_jax.interop import formats
from hyena_jax.model import config as config_lib
from hyena_jax.model.hyenadna import HyenaLM
from hyena_jax.training import pretrain as train
from hyena_jax.training import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
  """The CLI contract: exit 2 and exactly one stderr line, `error: ...` (no traceback)."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  return lines[0]


TOOLS = ("main", "finetune", "icl", "convert", "export", "embed", "score", "generate", "aot")
MODEL_TOOLS = ("convert", "export", "embed", "score", "generate")  # finetune, icl: --model too


def _tiny_lm() -> HyenaLM:
  cfg = config_lib.HyenaConfig(d_model=8, n_layer=1, d_inner=16, l_max=64, filter_order=8)
  lm = HyenaLM(cfg, rngs=nnx.Rngs(0))
  lm.eval()
  return lm


# ------------------------------------------------------------------------------------------------
# The command-line contract


def test_cli_run_one_line_for_input_errors_traceback_for_bugs(tmp_path):
  script = textwrap.dedent("""
      import sys
      from hyena_jax import cli
      from hyena_jax.errors import InputError
      def main(argv):
        if sys.argv[1] == "input":
          raise InputError("invalid run config:\\n  a must be >= 1\\n  b must be > 0")
        raise RuntimeError("a bug")
      cli.run(main)
  """)
  bad = _run(["-c", script, "input"], tmp_path)
  assert _one_line_error(bad) == "error: invalid run config: a must be >= 1; b must be > 0"
  bug = _run(["-c", script, "bug"], tmp_path)
  assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr


def test_unknown_config_key_gets_a_did_you_mean(tmp_path):
  result = _run(["-m", "hyena_jax.main", "--config.train.log_every_step=3",
                 "--workdir=runs/x"], tmp_path)
  line = _one_line_error(result)
  assert line.startswith("error: --config.train.log_every_step: train has no field "
                         "'log_every_step' (did you mean train.log_every_steps?)")
  assert not (tmp_path / "runs").exists()
  # Config files given as a flag (parsed with the other flags, not at definition).
  cohn = os.path.join(ROOT, "configs", "finetune.py") + ":human_enhancers_cohn"
  result = _run(["-m", "hyena_jax.finetune", f"--config={cohn}", "--workdir=ft",
                 "--config.optim.lerning_rate=1"], tmp_path)
  assert _one_line_error(result).startswith(
      "error: --config.optim.lerning_rate: optim has no field 'lerning_rate' (did you mean "
      "optim.learning_rate?)")
  result = _run(["-m", "hyena_jax.main", "--config=nope.py", "--workdir=runs/x"], tmp_path)
  assert _one_line_error(result).startswith("error: --config=nope.py: no such config file")
  assert sorted(os.listdir(tmp_path)) == []
  # A field given twice (ml_collections would join two tuples), a config file that does not
  # parse or has no get_config: one line each, naming the flag or file:line.
  (tmp_path / "broken.py").write_text("def get_config():\n  return dict(a=1\n")
  (tmp_path / "empty.py").write_text("CONFIG = 1\n")
  result = _run(["-m", "hyena_jax.main", "--config.train.stages=((4,64,1),)",
                 "--config.train.stages=((4,128,1),)", "--workdir=runs/x"], tmp_path)
  assert _one_line_error(result) == (
      "error: --config.train.stages is given twice; give each config field once")
  assert cli._config_file_error("config", str(tmp_path / "broken.py")).endswith(
      "broken.py:2: '(' was never closed (a syntax error in the config file)")
  assert cli._config_file_error("config", str(tmp_path / "empty.py")).endswith(
      "empty.py defines no get_config(): a config file returns its ConfigDict from a function "
      "get_config()")
  assert cli._config_file_error("config", os.path.join(ROOT, "configs", "1m.py")) is None
  assert sorted(os.listdir(tmp_path)) == ["broken.py", "empty.py"]
  # The message builder on its own: a top-level typo and a field without a close match.
  config = run_config.base_config()
  assert "did you mean train?" in cli._missing_field(config, "trian.seed")
  assert cli._missing_field(config, "train.foo").startswith("train has no field 'foo'; train "
                                                            "has: global_batch_size,")
  assert cli._missing_field(config, "optim.b1") is None


def test_init_from_another_architecture_names_the_fields(tmp_path):
  """checkpoint.init_from with a different architecture: an InputError (one `error:` line from
  the CLI) naming each field that differs, not a ValueError with two whole configs."""
  from hyena_jax.training import checkpoint
  lm = _tiny_lm()
  checkpoint.save_model(str(tmp_path / "source"), lm, {"model": lm.config.to_dict()})
  config = run_config.release_config("tiny-1k")
  config.model.update(lm.config.to_dict(), d_model=16, dtype="bfloat16", embed_dropout=0.0)
  config.train.update(global_batch_size=2, stages=((1, 32, 1),))
  config.mesh.data = 1
  config.checkpoint.init_from = str(tmp_path / "source")
  with pytest.raises(InputError, match=r"holds another architecture \(model.d_model: 8 there, "
                     r"16 in the config\): set those fields"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_config_validation_happens_before_compile(tmp_path):
  cases = [
      ({"checkpoint.every_steps": 0}, "checkpoint.every_steps must be an int >= 1, got 0"),
      ({"train.log_every_steps": 0}, "train.log_every_steps must be an int >= 1, got 0"),
      ({"optim.learning_rate": -0.01}, "optim.learning_rate must be > 0, got -0.01"),
      ({"train.global_batch_size": -4}, "train.global_batch_size must be a positive int, got -4"),
      ({"mesh.sequence": 3}, "mesh.sequence=3 does not divide model.d_model=128"),
      ({"mesh.fsdp": 0}, "mesh.fsdp must be >= 1, or -1"),
      ({"model.dtype": "float16"}, "model.dtype='float16' cannot train: there is no loss scaling"),
      ({"eval.every_steps": -1}, "eval.every_steps must be an int >= 0 (0 = evaluate only"),
  ]
  for change, message in cases:
    config = run_config.base_config()
    ((name, value),) = change.items()
    section, key = name.split(".")
    config[section][key] = value
    with pytest.raises(InputError, match="invalid run config:") as e:
      run_config.validate(config)
    assert message in str(e.value), (name, str(e.value))
  run_config.validate(run_config.base_config())  # the defaults pass; eval.every_steps=0 too
  # Through the training entry point: refused before the workdir is created.
  config = run_config.base_config()
  config.checkpoint.every_steps = 0
  with pytest.raises(InputError, match="checkpoint.every_steps must be an int >= 1"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
  config = run_config.base_config()
  config.eval.every_steps = 0
  run_config.validate(config)
  with pytest.raises(InputError, match=r"unknown HyenaConfig field\(s\) \['d_modle'\]; did you "
                                       r"mean 'd_model'"):
    config_lib.from_dict({"d_modle": 8})


def test_empty_model_input_is_a_clear_error():
  lm = _tiny_lm()
  with pytest.raises(InputError, match=r"input_ids \(1, 0\) hold no tokens \(length 0\)"):
    lm(jnp.zeros((1, 0), jnp.int32))
  with pytest.raises(InputError, match=r"sequence 0: empty sequence \(length 0\)"):
    inference.encode_record(tokenizer.CharacterTokenizer(),
                            seqfiles.Record("seq0", "", "sequence 0"), 64)


# ------------------------------------------------------------------------------------------------
# Files: binary, truncated gzip, duplicate names and the header rule are in test_seqfiles.py.
# Weights files


def test_random_bytes_safetensors_is_one_line_naming_the_file(tmp_path):
  bad = tmp_path / "model.safetensors"
  bad.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(InputError, match=r"model\.safetensors: not a readable \.safetensors file"):
    hyena_jax.load(str(bad))                       # every --model=
  result = _run(["-m", "hyena_jax.convert", f"--model={bad}", "--output=out"], tmp_path)
  line = _one_line_error(result)
  assert f"{bad}: not a readable .safetensors file" in line
  assert not (tmp_path / "out").exists()


def test_missing_safetensors_names_the_install(tmp_path, monkeypatch):
  (tmp_path / "w.safetensors").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # import fails as if absent
  with pytest.raises(MissingDependencyError, match=r"safetensors package \(a dependency of "
                                                   r"hyena_jax\): pip install safetensors"):
    formats.read_state_dict(str(tmp_path / "w.safetensors"))


def _truncated_gz(path, text: str):
  blob = gzip.compress(text.encode())
  path.write_bytes(blob[:len(blob) // 2])
  return str(path)


def test_finetune_refuses_damaged_data_before_creating_its_workdir(tmp_path):
  tsv_gz = _truncated_gz(tmp_path / "t.tsv.gz", "".join(f"{'ACGT' * 50}\t1\n" for _ in range(300)))
  config = finetune_config.base_config()
  config.data.update(train=tsv_gz, test=tsv_gz)
  config.mesh.data = 1
  with pytest.raises(InputError, match=r"t\.tsv\.gz:\d+: the gzip data is damaged"):
    finetune.finetune_and_evaluate(config, str(tmp_path / "ft"))
  assert not (tmp_path / "ft").exists()


def test_inference_help_lists_model_and_input_errors_leave_no_output(tmp_path):
  from hyena_jax.training import checkpoint
  helped = _run(["-m", "hyena_jax.embed", "--help"], tmp_path)
  assert "--model:" in helped.stdout and "--input:" in helped.stdout  # not only --helpfull
  lm = _tiny_lm()
  checkpoint.save_model(str(tmp_path / "run"), lm, {"model": lm.config.to_dict()})
  fa_gz = _truncated_gz(tmp_path / "in.fa.gz",
                        "".join(f">r{i}\n{'ACGT' * 10}\n" for i in range(2000)))
  result = _run(["-m", "hyena_jax.embed", "--model=run", f"--input={fa_gz}", "--output=e.npz"],
                tmp_path)
  assert "in.fa.gz:" in _one_line_error(result) and "damaged or truncated" in result.stderr
  assert sorted(os.listdir(tmp_path)) == ["in.fa.gz", "run"]


def test_every_cli_help_runs_and_names_model_and_output(tmp_path):
  """One convention: --help exits 0; --model is the model source, --output the output; the old
  names (export's --workdir, convert's --from) are gone: one error line names the flag."""
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  runs = {tool: subprocess.Popen([sys.executable, "-m", f"hyena_jax.{tool}", "--help"], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for tool in TOOLS}
  old = _run(["-m", "hyena_jax.export", "--workdir=a", "--output=c"], tmp_path)
  for tool, proc in runs.items():
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (tool, err[-2000:])
    assert "flags:" in out, tool
    if tool in MODEL_TOOLS:
      assert "--model:" in out and "--output:" in out, (tool, out)
      assert "--out:" not in out and "--from:" not in out and "--workdir:" not in out, tool
  assert "workdir" in _one_line_error(old) and old.returncode == 2


def test_print_config_shows_fields_and_model_sets_pretrained(tmp_path):
  """--help points at --print_config, which prints the resolved config (overrides and --model
  applied) and exits 0 without a --workdir; --model and a different --config.pretrained clash."""
  table = os.path.join(ROOT, "configs", "finetune.py")
  icl_file = os.path.join(ROOT, "configs", "icl.py")
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  commands = {
      "main": ["-m", "hyena_jax.main", "--print_config", "--config.optim.learning_rate=0.125"],
      "main_help": ["-m", "hyena_jax.main", "--help"],
      "finetune": ["-m", "hyena_jax.finetune",
                   f"--config={table}:human_nontata_promoters:small_data", "--model=some/weights",
                   "--print_config"],
      "icl": ["-m", "hyena_jax.icl", f"--config={icl_file}", "--config.pretrained=old/spelling",
              "--print_config"],
      "clash": ["-m", "hyena_jax.finetune", f"--config={table}:nt_H3", "--model=a",
                "--config.pretrained=b", "--workdir=w"],
      "typo": ["-m", "hyena_jax.finetune", f"--config={table}:human_enhancers_chon",
               "--workdir=w"],
  }
  procs = {k: subprocess.Popen([sys.executable, *v], cwd=tmp_path, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for k, v in commands.items()}
  out = {}
  for k, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=300)
    out[k] = subprocess.CompletedProcess(commands[k], proc.returncode, stdout, stderr)
  assert out["main"].returncode == 0, out["main"].stderr
  assert "learning_rate: 0.125" in out["main"].stdout and "global_batch_size" in out["main"].stdout
  assert out["main_help"].returncode == 0 and "--[no]print_config" in out["main_help"].stdout
  ft = out["finetune"]
  assert ft.returncode == 0, ft.stderr
  assert "pretrained: some/weights" in ft.stdout and "task: human_nontata_promoters" in ft.stdout
  assert "batch_size: 32" in ft.stdout  # the small_data recipe
  assert out["icl"].returncode == 0 and "pretrained: old/spelling" in out["icl"].stdout
  assert "--model=a and --config.pretrained=b disagree" in _one_line_error(out["clash"])
  assert "did you mean human_enhancers_cohn?" in _one_line_error(out["typo"])
  assert sorted(os.listdir(tmp_path)) == []


def test_finetune_task_table_keeps_each_task_and_names_the_known_ones():
  import runpy
  table = runpy.run_path(os.path.join(ROOT, "configs", "finetune.py"))
  get_config = table["get_config"]
  assert len(table["TASKS"]) == 25
  cohn = get_config("human_enhancers_cohn")
  assert (cohn.task, cohn.data.max_length, cohn.head.n_classes, cohn.eval.metric) == (
      "human_enhancers_cohn", 500, 2, "accuracy")
  assert cohn.to_dict() == get_config("human_enhancers_cohn:official").to_dict()
  assert get_config("human_enhancers_cohn:small_data").train.batch_size == 32
  assert get_config("dummy_mouse_enhancers_ensembl").model.l_max == 4709
  splice = get_config("nt_splice_sites_donors")
  assert (splice.data.max_length, splice.eval.metric, splice.model.d_model) == (
      600, "macro_f1", 256)
  with pytest.raises(InputError, match=r"did you mean nt_H3K4me3\?.*nt_splice_sites_donors"):
    get_config("nt_H3K4me33")
  with pytest.raises(InputError, match="no fine-tuning task given"):
    get_config()
  with pytest.raises(InputError, match="recipe"):
    get_config("nt_H3:fast")


def test_usage_lines_keep_their_shell_continuations():
  """A backslash at the end of a usage line in a (non-raw) docstring joins the lines, and --help
  showed the next line's indentation as a run of spaces inside the command."""
  import ast
  import glob
  for path in sorted(glob.glob(os.path.join(ROOT, "hyena_jax", "**", "*.py"), recursive=True) +
                     glob.glob(os.path.join(ROOT, "launch", "*.py"))):
    source = open(path).read()
    doc = ast.get_docstring(ast.parse(source), clean=False)
    if not doc:
      continue
    written = source[source.index(doc.split("\n")[0]):].split('"""')[0]  # the docstring as typed
    assert doc.count("\\\n") == written.count("\\\n"), path


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
  """/proc takes no new file (os.access says it does, and says yes to root everywhere): embed,
  score and export probe the folder with a real file first, and name it."""
  from hyena_jax import storage
  from hyena_jax.interop import export
  with pytest.raises(InputError, match=r"--output /proc/x\.npz: cannot write in /proc"):
    inference.check_local_output("/proc/x.npz")
  with pytest.raises(InputError, match="is a folder; name the file to write"):
    inference.check_local_output(str(tmp_path))
  inference.check_local_output(str(tmp_path / "ok.npz"))
  storage.check_writable(str(tmp_path / "missing" / "x"), "--output")  # the writer names it
  assert os.listdir(tmp_path) == []  # the probe file is gone
  with pytest.raises(InputError, match=r"--output /proc/exported: cannot write in /proc"):
    export.export(str(tmp_path / "no_run"), "/proc/exported")


def test_the_aot_tool_follows_the_cli_conventions(tmp_path):
  """`python -m hyena_jax.aot`: --help exits 0; a missing --config (a traceback before) is one
  `error:` line, exit 2; an unknown target is an InputError naming the known ones, which
  cli.run prints as one line."""
  assert _run(["-m", "hyena_jax.aot", "--help"], tmp_path).returncode == 0
  assert _one_line_error(_run(["-m", "hyena_jax.aot"], tmp_path)) == (
      "error: --config is required; see --help")
  from hyena_jax.training import aot
  with pytest.raises(InputError, match="unknown target 'h1000'"):
    aot.get_target("h1000")
  # A target whose compiler is not installed is refused before any compile, saying what to
  # install (CI's main test run has neither libtpu nor the CUDA plugin).
  for name, package, extra in (("v5e-1", "libtpu", "tpu"), ("h100", "jax_cuda12_plugin",
                                                            "cuda12")):
    if importlib.util.find_spec(package) is None:
      with pytest.raises(InputError, match=rf"target {name} needs its compiler \({package}\), "
                         rf'which is not installed: pip install -e "\.\[{extra}\]"'):
        aot.check_compiler(aot.get_target(name))


def test_aot_advice_offers_only_what_applies():
  """At batch 1 on one device neither more grad_accum nor context parallelism can help."""
  from hyena_jax.training import aot
  config = run_config.release_config("tiny-1k")
  config.model.remat, config.model.scan_layers = "block", True
  config.train.global_batch_size, config.train.stages = 1, ((1, 1024, 1),)
  one_chip = aot.fit_advice(20.0, 15.75, config, devices=1)
  assert one_chip.startswith("needs 4.2 GiB more than the 15.75 GiB of HBM per chip")
  assert "grad_accum" not in one_chip and "context parallelism" not in one_chip
  assert "offload" in one_chip
  config.train.global_batch_size = 8
  eight = aot.fit_advice(20.0, 15.75, config, devices=8)
  assert "grad_accum" not in eight          # 8 sequences over 8 devices: one each
  assert "context parallelism" in eight
  config.train.global_batch_size = 32
  assert "grad_accum" in aot.fit_advice(20.0, 15.75, config, devices=8)
  assert aot.fit_advice(15.0, 15.75, config, devices=8) == ""


def test_a_background_thread_that_lost_a_peer_leaves_no_traceback(monkeypatch):
  """When a process of a multi-process run is killed during a checkpoint save, orbax's commit
  thread meets the lost peer too (its barrier's allgather fails). The main thread reports it in
  one `error:` line, so the thread's traceback is not printed; other thread errors still are."""
  import logging as py_logging
  import threading

  import jax
  from hyena_jax import cli
  printed = []
  monkeypatch.setattr(cli, "_default_thread_excepthook", [printed.append])
  monkeypatch.setattr(jax, "process_count", lambda: 2)

  def hook_args(error):
    return threading.ExceptHookArgs([type(error), error, None, threading.current_thread()])

  lost = jax.errors.JaxRuntimeError(
      "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] "
      "Connection closed by peer [127.0.0.1]:34723")
  bug = ValueError("a bug in a background thread")
  cli._thread_excepthook(hook_args(lost))
  assert printed == []
  cli._thread_excepthook(hook_args(bug))
  assert len(printed) == 1
  # orbax's commit thread logs it with logging.exception: that record is dropped too.
  def orbax_record(error):
    return py_logging.LogRecord(
        "absl", py_logging.ERROR, "/venv/orbax/checkpoint/_src/futures/future.py", 387,
        "_SignalingThread.run() raised an exception: %s", (error,),
        (type(error), error, None))
  assert not cli._FILTER.filter(orbax_record(lost))
  assert cli._FILTER.filter(orbax_record(bug))
