"""The official PyTorch HyenaDNA files: reading any of their weight files, writing ours in the
three layouts, and their config.json (SPEC sections 2 and 13).

  * hf          `model.safetensors` (float32, `{"format": "pt"}`) + -hf `config.json`;
  * lightning   `weights.ckpt` = `{"state_dict": {"model.backbone...": ...}}` + original-style
                `config.json`;
  * standalone  `weights.pt` = `standalone_hyenadna` state_dict + original-style `config.json`.

Which tensor goes under which key is `weights.py`'s business; here are only the containers.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from hyena_jax.data import tokenizer
from hyena_jax.errors import InputError, MissingDependencyError, MissingInputError
from hyena_jax.interop.weights import LazyTensor
from hyena_jax.model.config import HyenaConfig

HF_SHIFT = 0.05  # hard-coded in the -hf remote code's ExponentialModulation (SPEC 13)


HF_LAYER_NORM_EPSILON = 1e-5  # the -hf remote code's norm1/norm2 use 1e-5 whatever the config says


DEFAULT_REMOTE_CODE = "LongSafari/hyenadna-tiny-1k-seqlen-hf"


# What export writes per layout.
WEIGHT_FILE_OF_LAYOUT = {"hf": "model.safetensors", "lightning": "weights.ckpt",
                         "standalone": "weights.pt"}
# The one list of official weight-file names, in the order they are looked for inside a folder:
# pickle-free safetensors first (HF -hf, our exports), then Lightning checkpoints (original repo
# and training outputs), then the standalone state_dict and the HF torch pickle.
WEIGHT_FILES = ("model.safetensors", "weights.safetensors", "weights.ckpt", "last.ckpt",
                "weights.pt", "pytorch_model.bin")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a .safetensors, or a torch pickle with `weights_only=True`, into float32 numpy."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingInputError(f"checkpoint file not found: {path}")
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise MissingDependencyError(f"reading {path} needs the safetensors package (a "
                                   "dependency of hyena_jax): pip install safetensors") from e
    try:
      tensors = load_file(path)
    except Exception as e:  # SafetensorError for a damaged header, OSError for a short file
      raise InputError(f"{path}: not a readable .safetensors file ({e}); re-download it or "
                       "point --model/--from at the right file") from e
    return {k: np.asarray(v) for k, v in tensors.items()}
  try:
    import torch
  except ImportError as e:
    raise MissingDependencyError(f"reading {path} needs PyTorch: pip install -e \".[torch]\" "
                                 "(on a CPU-only machine install the CPU build of torch first)"
                                 ) from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError subclasses and RuntimeErrors here
    raise InputError(f"{path}: torch.load(weights_only=True) refused this file ({e}). Only plain "
                     "tensor state_dicts and Lightning checkpoints are read; pickled code is "
                     "never executed.") from e
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise InputError(f"{path}: expected a state_dict (mapping of tensors), got "
                     f"{type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      raise InputError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
  return out


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
