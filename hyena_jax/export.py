"""Exports an orbax checkpoint of this project to the official PyTorch HyenaDNA formats.

    python -m hyena_jax.export --model=RUN [--step=N] --output=DIR [--layout=hf|lightning|standalone]

Layouts (SPEC section 2):
  * hf          `model.safetensors` (float32, `{"format": "pt"}`) + -hf `config.json`; loads with
                the LongSafari remote code (`AutoModelForCausalLM`, trust_remote_code) and with
                `hyena_jax.torch_reference`. Language models only, shift 0.05 only (SPEC 13).
  * lightning   `weights.ckpt` = `{"state_dict": {"model.backbone...": ...}}` + original-style
                `config.json`, optionally with the `.mixer.layer.`/`.mlp.layer.` key level
                (`--checkpoint_mixer`); a classifier's head is `decoder.0.output_transform.*`.
  * standalone  `weights.pt` = `standalone_hyenadna` state_dict (`backbone.*`,
                `head.output_transform.*` for a classifier) + original-style `config.json`.
The original-style configs carry the run's `shift` as `layer.shift` (no official config records
it; `standalone_hyenadna` passes it through, and our importer reads it).

Only the parameters are restored (never the optimizer state), as host numpy arrays, and the
tensors are converted one at a time; `pos_emb.z`/`t` and `modulation.deltas`, which dominate the
file at 1M context (n_layer * l_max * 6 floats), are built once and written for every layer.
Output is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from hyena_jax import checkpoint, storage
from hyena_jax import tokenizer
from hyena_jax import weights
from hyena_jax.config import HyenaConfig
from hyena_jax.errors import InputError, MissingDependencyError, OutputExistsError

LAYOUTS = ("hf", "lightning", "standalone")
HF_SHIFT = 0.05  # hard-coded in the -hf remote code's ExponentialModulation (SPEC 13)
HF_LAYER_NORM_EPSILON = 1e-5  # the -hf remote code's norm1/norm2 use 1e-5 whatever the config says
DEFAULT_REMOTE_CODE = "LongSafari/hyenadna-tiny-1k-seqlen-hf"
WEIGHT_FILES = {"hf": "model.safetensors", "lightning": "weights.ckpt", "standalone": "weights.pt"}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """One output tensor: its key and shape now, its float32 data only when `make()` is called."""
  key: str
  shape: tuple[int, ...]
  make: Callable[[], np.ndarray]


# ------------------------------------------------------------------------------------------------
# Parameters -> PyTorch state dict


def _torch_shape(to_torch: Callable[[np.ndarray], np.ndarray], shape: tuple) -> tuple[int, ...]:
  """Shape after `to_torch` (an axis permutation) without converting the real tensor: apply it to
  a tiny probe with distinct axis sizes and read the permutation off the result."""
  probe = np.zeros(tuple(range(2, 2 + len(shape))), np.float32)
  permuted = to_torch(probe).shape
  return tuple(shape[probe.shape.index(n)] for n in permuted)


def _lookup(params: Mapping, path: tuple) -> Any:
  node = params
  for part in path:
    if part not in node and str(part) in node:  # int list indices may come back as strings
      part = str(part)
    node = node[part]
  return node


def check_exportable(cfg: HyenaConfig, layout: str, n_classes: int = 0, pooling: str = "mean"
                     ) -> None:
  """Raises ValueError naming every model feature that `layout` cannot express."""
  if layout not in LAYOUTS:
    raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  problems = []
  if layout == "hf":
    if cfg.shift != HF_SHIFT:
      problems.append(
          f"shift={cfg.shift}: the -hf remote code hard-codes shift {HF_SHIFT} in the filter "
          "modulation, so this model would compute different outputs there; export it with "
          "--layout=lightning or --layout=standalone (which record the shift in config.json), or "
          f"train with model.shift={HF_SHIFT}")
    if cfg.layer_norm_epsilon != HF_LAYER_NORM_EPSILON:
      problems.append(
          f"layer_norm_epsilon={cfg.layer_norm_epsilon}: the -hf remote code hard-codes "
          f"{HF_LAYER_NORM_EPSILON} in norm1/norm2, so this model would compute different "
          "outputs there; export it with --layout=lightning or --layout=standalone (which record "
          f"the epsilon in config.json), or train with model.layer_norm_epsilon="
          f"{HF_LAYER_NORM_EPSILON}")
    if not cfg.modulate:
      problems.append("modulate=False: the -hf config has no such switch (always modulated); use "
                      "--layout=lightning or --layout=standalone")
    if n_classes:
      problems.append(
          "a classification head: the -hf HyenaDNAForSequenceClassification head (`score`, no "
          "bias, different pooling) cannot hold it; use --layout=standalone or --layout=lightning, "
          "or --nohead to export only the backbone as a language model")
  if n_classes and pooling != "mean":
    problems.append(f"pooling={pooling!r}: the official head pools by mean in the standalone "
                    "model and official configs do not record a pooling mode")
  if problems:
    raise InputError(f"cannot export this model to the {layout!r} layout:\n  - " +
                     "\n  - ".join(problems))


def state_dict_from_params(params: Mapping, cfg: HyenaConfig, *, layout: str = "hf",
                           n_classes: int = 0, checkpoint_mixer: bool = False,
                           freq_aliases: bool | None = None) -> list[LazyTensor]:
  """The PyTorch state dict of `params` (our NNX pure dict) in `layout`, as lazy float32 tensors.

  `freq_aliases` also lists `implicit_filter.{2j+1}.freq` for j = 1..num_inner_mlps (the same
  tensor as `.1`, as PyTorch's `state_dict()` does; default for the pickle layouts, never in
  safetensors, which rejects shared tensors). `checkpoint_mixer` adds Lightning's `.mixer.layer.`/`.mlp.layer.` level.
  """
  if layout not in LAYOUTS:
    raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if freq_aliases is None:
    freq_aliases = layout != "hf"
  if checkpoint_mixer and layout != "lightning":
    raise InputError("checkpoint_mixer (the `.mixer.layer.` key level) exists only in the "
                     "lightning layout")
  head_prefix = "decoder.0" if layout == "lightning" else "head"
  prefix = {"hf": "hyena.", "lightning": "model.", "standalone": ""}[layout]

  def rename(canonical: str) -> str:
    if canonical.startswith(f"{head_prefix}.output_transform."):
      return canonical  # Lightning's decoder sits outside `model.`
    if checkpoint_mixer:
      canonical = canonical.replace(".mixer.", ".mixer.layer.").replace(".mlp.", ".mlp.layer.")
    return prefix + canonical

  out: list[LazyTensor] = []
  for e in weights.key_map(cfg, n_classes, head_prefix):
    try:
      value = _lookup(params, e.path)
    except KeyError as err:
      raise InputError(f"the checkpoint has no parameter {'.'.join(map(str, e.path))} that "
                       f"{e.torch_key} needs; it does not match its own model config") from err
    make = (lambda v=value, f=e.to_torch: np.asarray(f(np.asarray(v, np.float32)), np.float32))
    shape = _torch_shape(e.to_torch, tuple(value.shape))
    keys = [e.torch_key]
    if freq_aliases and e.torch_key.endswith("implicit_filter.1.freq"):
      # The Sin after each of the num_inner_mlps + 1 hidden linears sits at index 2j + 1; all
      # are one module, so PyTorch's state_dict lists its freq under each index.
      keys += [e.torch_key.replace(".1.freq", f".{2 * j + 1}.freq")
               for j in range(1, cfg.num_inner_mlps + 1)]
    out += [LazyTensor(rename(k), shape, make) for k in keys]

  # Buffers: identical in every layer, so built once (float32, for exactly l_max).
  cache: dict[str, np.ndarray] = {}

  def layer0(suffix: str) -> np.ndarray:
    if not cache:
      one = weights.buffers(dataclasses.replace(cfg, n_layer=1))
      cache.update({k.rsplit("filter_fn.", 1)[1]: v for k, v in one.items()})
    return cache[suffix]

  shapes = {"pos_emb.z": (1, cfg.l_max, cfg.emb_dim), "pos_emb.t": (1, cfg.l_max, 1),
            "modulation.deltas": (1, 1, cfg.d_model)}
  makers = {suffix: (lambda s=suffix: layer0(s)) for suffix in shapes}  # one per buffer kind
  for i in range(cfg.n_layer):
    for suffix, shape in shapes.items():
      key = f"backbone.layers.{i}.mixer.filter_fn.{suffix}"
      out.append(LazyTensor(rename(key), shape, makers[suffix]))
  if not n_classes and layout in ("hf", "lightning"):
    emb = next(t for t in out if t.key.endswith("embeddings.word_embeddings.weight"))
    # Tied head: the -hf file stores an equal copy (tie_word_embeddings false, SPEC 13).
    out.append(LazyTensor(("" if layout == "hf" else "model.") + "lm_head.weight", emb.shape,
                          emb.make))
  return out


def materialize(tensors: Iterable[LazyTensor]) -> dict[str, np.ndarray]:
  """{key: float32 array} (for tests and small models; the writers stream instead)."""
  return {t.key: t.make() for t in tensors}


# ------------------------------------------------------------------------------------------------
# Configs


def hf_config(cfg: HyenaConfig, remote_code_repo: str = DEFAULT_REMOTE_CODE) -> dict[str, Any]:
  """-hf style config.json (HyenaConfig of the LongSafari remote code, SPEC 13)."""
  code = f"{remote_code_repo}--"
  return {
      "architectures": ["HyenaDNAForCausalLM"],
      "auto_map": {
          "AutoConfig": code + "configuration_hyena.HyenaConfig",
          "AutoModel": code + "modeling_hyena.HyenaDNAModel",
          "AutoModelForCausalLM": code + "modeling_hyena.HyenaDNAForCausalLM",
          "AutoModelForSequenceClassification":
              code + "modeling_hyena.HyenaDNAForSequenceClassification",
      },
      "model_type": "hyenadna",
      "d_model": cfg.d_model,
      "n_layer": cfg.n_layer,
      "d_inner": cfg.d_inner,
      "vocab_size": cfg.vocab_size,
      "max_seq_len": cfg.l_max,
      "emb_dim": cfg.emb_dim,
      "filter_order": cfg.filter_order,
      "short_filter_order": cfg.short_filter_order,
      "hyena_order": cfg.hyena_order,
      "num_inner_mlps": cfg.num_inner_mlps,
      "activation_freq": cfg.activation_freq,
      "train_freq": True,
      "use_bias": True,
      "embed_dropout": cfg.embed_dropout,
      "hyena_dropout": cfg.hyena_dropout,
      "hyena_filter_dropout": 0.0,
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_range": cfg.initializer_range,
      "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
      "pad_token_id": tokenizer.PAD,
      "tie_word_embeddings": False,
      "torch_dtype": "float32",
  }


def original_config(cfg: HyenaConfig, *, n_classes: int = 0, checkpoint_mixer: bool = False
                    ) -> dict[str, Any]:
  """Original-style config.json (nested `layer`, as the non-hf repos ship beside weights.ckpt)."""
  layer: dict[str, Any] = {
      "_name_": "hyena", "emb_dim": cfg.emb_dim, "filter_order": cfg.filter_order,
      "local_order": cfg.short_filter_order, "l_max": cfg.l_max, "modulate": cfg.modulate,
      "w": cfg.activation_freq,
      # Not recorded by any official config: the standalone model passes it through to the
      # modulation and hyena_jax.convert reads it back.
      "shift": cfg.shift,
  }
  if cfg.num_inner_mlps != 2:
    layer["num_inner_mlps"] = cfg.num_inner_mlps
  out: dict[str, Any] = {
      "d_model": cfg.d_model, "n_layer": cfg.n_layer, "d_inner": cfg.d_inner,
      "vocab_size": cfg.vocab_size, "resid_dropout": cfg.resid_dropout,
      "embed_dropout": cfg.embed_dropout, "fused_mlp": False, "fused_dropout_add_ln": False,
      "residual_in_fp32": True, "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
      "return_hidden_state": True, "checkpoint_mixer": checkpoint_mixer,
      "checkpoint_mlp": checkpoint_mixer, "layer": layer,
  }
  if cfg.layer_norm_epsilon != 1e-5:
    out["layer_norm_epsilon"] = cfg.layer_norm_epsilon
  if n_classes:
    out.update(use_head=True, n_classes=n_classes)
  return out


# ------------------------------------------------------------------------------------------------
# Writers


def write_safetensors(path: str, tensors: Sequence[LazyTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes float32 tensors in the safetensors format, one tensor in memory at a time.

  The format is an 8-byte little-endian header size, a JSON header (dtype, shape and byte range
  of every tensor, plus `__metadata__`) padded with spaces to 8 bytes, then the raw data. The
  `safetensors` library only writes from a dict held fully in memory, hence this writer; tests
  read its files back with the library.
  """
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  for t in tensors:
    if t.key in header:
      raise ValueError(f"duplicate tensor key {t.key}")
    nbytes = 4 * int(np.prod(t.shape, dtype=np.int64))
    header[t.key] = {"dtype": "F32", "shape": list(t.shape),
                     "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for t in tensors:
      arr = np.ascontiguousarray(t.make(), dtype="<f4")
      if arr.shape != t.shape:
        raise AssertionError(f"{t.key}: produced shape {arr.shape}, declared {t.shape}")
      f.write(memoryview(arr).cast("B"))


def write_torch(path: str, tensors: Sequence[LazyTensor], *, wrap_lightning: bool,
                global_step: int = 0) -> None:
  """torch.save of the state dict (aliases and repeated buffers share storage, stored once)."""
  try:
    import torch
  except ImportError as e:
    raise MissingDependencyError("the lightning/standalone layouts are PyTorch pickles and need "
                                 'PyTorch: pip install -e ".[torch]" (or export --layout=hf)'
                                 ) from e
  made: dict[int, Any] = {}  # one torch tensor per producer, shared by its aliases
  state = {}
  for t in tensors:
    key = id(t.make)
    if key not in made:
      arr = np.ascontiguousarray(t.make(), np.float32)
      made[key] = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    state[t.key] = made[key]
  obj = {"state_dict": state, "global_step": global_step} if wrap_lightning else state
  torch.save(obj, path)


# ------------------------------------------------------------------------------------------------
# Restore and export


def _model_of(run_config: dict, workdir: str, step: int) -> tuple[HyenaConfig, int, str]:
  """(model config, n_classes, pooling) of a run config, or a clear error."""
  try:
    cfg = checkpoint.model_config(run_config)
    n_classes, pooling = checkpoint.head_of(run_config)
  except (KeyError, TypeError, ValueError) as e:
    raise InputError(f"{workdir} step {step}: the run config's model section is not one this "
                     f"exporter understands: {e}") from e
  return cfg, n_classes, pooling


def restore_params(workdir: str, step: int | None = None) -> tuple[dict, dict, int]:
  """Restores only the parameters of a checkpoint as host numpy arrays (no model is built, no
  optimizer state is read). Returns (params pure dict, run config, step)."""
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx
  run_config, step = checkpoint.read_run_config(workdir, step)
  cfg, n_classes, pooling = _model_of(run_config, workdir, step)
  abstract = nnx.eval_shape(lambda: checkpoint.build_model(cfg, n_classes, pooling or "mean"))
  target = checkpoint.abstract_params(abstract)
  restore_args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray), target)
  with ocp.CheckpointManager(checkpoint.checkpoint_dir(workdir),
                             options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    restored = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)))
  checkpoint.verify_saved_params(workdir, step, restored["params"])
  return restored["params"], run_config, step


# Every file an export may write; --overwrite replaces only these, whatever else the folder holds.
EXPORT_FILES = tuple(WEIGHT_FILES.values()) + ("config.json",)


def _publish(tmp_dir: str, out_dir: str, overwrite: bool) -> None:
  """Moves the finished temporary directory to `out_dir`.

  With `overwrite` and an existing `out_dir`, each file this exporter writes is renamed into it
  (replacing the old one), and the other layouts' weight files are removed (they would no longer
  match config.json); files the exporter never writes are left untouched.
  """
  if storage.is_url(out_dir):
    _upload(tmp_dir, storage.resolve(out_dir), overwrite)
    return
  if not os.path.exists(out_dir):
    os.replace(tmp_dir, out_dir)
    return
  if not overwrite:
    raise OutputExistsError(f"{out_dir} exists; choose another --output or pass --overwrite")
  written = os.listdir(tmp_dir)
  for name in written:
    os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
  for name in EXPORT_FILES:
    stale = os.path.join(out_dir, name)
    if name not in written and os.path.isfile(stale):
      os.remove(stale)
  os.rmdir(tmp_dir)


def _upload(tmp_dir: str, out_dir, overwrite: bool) -> None:
  """`_publish` for an object store (no rename): each file is one upload, which appears whole,
  and config.json goes last, so a reader that finds it finds the weights it describes."""
  if out_dir.exists() and not overwrite:
    raise OutputExistsError(f"{out_dir} exists; choose another --output or pass --overwrite")
  written = sorted(os.listdir(tmp_dir), key=lambda name: name == "config.json")
  for name in written:
    with open(os.path.join(tmp_dir, name), "rb") as f:
      (out_dir / name).write_bytes(f.read())
  for name in EXPORT_FILES:
    if name not in written and (out_dir / name).exists():
      (out_dir / name).unlink()
  shutil.rmtree(tmp_dir)


def export(workdir: str, out_dir: str, step: int | None = None, layout: str = "hf", *,
           include_head: bool = True, checkpoint_mixer: bool = False,
           remote_code_repo: str = DEFAULT_REMOTE_CODE, overwrite: bool = False) -> str:
  """Exports checkpoint `step` (default: latest) of `workdir` to `out_dir`; returns out_dir.

  Refuses (ValueError) what `layout` cannot express before anything is written; the directory
  appears only once complete.
  """
  if layout not in LAYOUTS:
    raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  storage.check_access(workdir, "--model")
  storage.check_access(out_dir, "--output")
  out_path = storage.resolve(out_dir)
  out_dir = os.fspath(out_path)
  if out_path.exists() and not overwrite:
    raise OutputExistsError(f"{out_dir} exists; choose another --output or pass --overwrite")
  if out_path.exists() and not out_path.is_dir():
    raise OutputExistsError(f"{out_dir} is a file, not a folder; choose another --output")
  storage.check_writable(out_dir, "--output")  # the export is built beside it, then renamed
  run_config, step = checkpoint.read_run_config(workdir, step)
  cfg, n_classes, pooling = _model_of(run_config, workdir, step)
  if not include_head:
    n_classes, pooling = 0, ""
  check_exportable(cfg, layout, n_classes, pooling)  # before restoring anything
  params, _, step = restore_params(workdir, step)
  tensors = state_dict_from_params(params, cfg, layout=layout, n_classes=n_classes,
                                   checkpoint_mixer=checkpoint_mixer)
  # Built beside the output (one rename publishes it), or in local temp space for a bucket.
  parent = tempfile.gettempdir() if storage.is_url(out_dir) else os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_dir = tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp_dir, 0o777 & ~umask)  # mkdtemp's 0700 would make the published dir private
  try:
    weights_path = os.path.join(tmp_dir, WEIGHT_FILES[layout])
    if layout == "hf":
      write_safetensors(weights_path, tensors, {"format": "pt"})
      config_json = hf_config(cfg, remote_code_repo)
    else:
      write_torch(weights_path, tensors, wrap_lightning=layout == "lightning", global_step=step)
      config_json = original_config(cfg, n_classes=n_classes, checkpoint_mixer=checkpoint_mixer)
    with open(os.path.join(tmp_dir, "config.json"), "w") as f:
      json.dump(config_json, f, indent=2)
      f.write("\n")
    _publish(tmp_dir, out_dir, overwrite)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  return out_dir


# ------------------------------------------------------------------------------------------------
# Command line

if __name__ == "__main__":
  from absl import app, flags, logging

  from hyena_jax import cli

  flags.DEFINE_string("model", None, "Orbax run to export (a folder holding checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
  flags.DEFINE_string("output", None, "Output directory (must not exist unless --overwrite).")
  cli.define_deprecated_alias("workdir", "model")
  cli.define_deprecated_alias("out", "output")
  flags.DEFINE_enum("layout", "hf", LAYOUTS, "hf: model.safetensors + -hf config.json; "
                    "lightning: weights.ckpt; standalone: weights.pt (standalone_hyenadna).")
  flags.DEFINE_bool("head", True, "Export a classifier's head (--nohead: the backbone only, as a "
                    "language model with the tied embedding head).")
  flags.DEFINE_bool("checkpoint_mixer", False, "lightning only: `.mixer.layer.`/`.mlp.layer.` "
                    "keys, as models trained with activation checkpointing.")
  flags.DEFINE_string("remote_code_repo", DEFAULT_REMOTE_CODE,
                      "hf only: hub repository whose modeling_hyena.py auto_map points to.")
  flags.DEFINE_bool("overwrite", False, "Write into an existing --output folder, replacing only the "
                    "files export writes (weights, config.json); other files stay.")
  FLAGS = flags.FLAGS

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    out = export(cli.aliased("model", "workdir"), cli.aliased("output", "out"), FLAGS.step,
                 FLAGS.layout, include_head=FLAGS.head,
                 checkpoint_mixer=FLAGS.checkpoint_mixer,
                 remote_code_repo=FLAGS.remote_code_repo, overwrite=FLAGS.overwrite)
    logging.info("wrote %s", out)
    print(out)

  cli.run(main)
