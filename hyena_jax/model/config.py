"""Validated model configuration, with the upstream HyenaDNA field names.

Field names follow the official code (`d_model`, `n_layer`, `d_inner`, `l_max`, `emb_dim`,
`filter_order`, ...); where the -hf `config.json` uses another name it is noted beside the field.
`HyenaConfig.from_official` reads both official styles (the nested `layer` dict of the original
checkpoints and the flat -hf `HyenaConfig`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from typing import Any, Literal, Mapping

from hyena_jax.data import tokenizer
from hyena_jax.errors import InputError

ConvImpl = Literal["fft", "pallas"]
RematPolicy = Literal["none", "block", "dots", "offload"]
SpectraDtype = Literal["float32", "bfloat16"]
CONV_IMPLS: tuple[str, ...] = typing.get_args(ConvImpl)
REMAT_POLICIES: tuple[str, ...] = typing.get_args(RematPolicy)
SPECTRA_DTYPES: tuple[str, ...] = typing.get_args(SpectraDtype)
_DTYPES = ("float32", "bfloat16", "float16")

# How the model computes, not what it computes or which weights it has: a loaded model, a resumed
# run or a fine-tune of a pretrained one may set these freely (everything else of a checkpoint's
# architecture is fixed by its weights).
EXECUTION_FIELDS = ("dtype", "conv_impl", "pallas_spectra_dtype", "remat", "scan_layers")
# What a run starting from pretrained weights (pretraining's init_from, fine-tuning, ICL) takes
# from its own config rather than the checkpoint's: how it computes and its embedding dropout.
STARTING_POINT_OVERRIDES = EXECUTION_FIELDS + ("embed_dropout",)


@dataclasses.dataclass(frozen=True)
class HyenaConfig:
  """HyenaDNA hyperparameters. Defaults are the released tiny-1k model."""

  d_model: int = 128
  n_layer: int = 2
  d_inner: int = 512                      # MLP hidden width (4 * d_model in every release)
  vocab_size: int = tokenizer.VOCAB_SIZE  # padded up to a multiple of pad_vocab_size_multiple
  pad_vocab_size_multiple: int = 8
  l_max: int = 1026                       # -hf: max_seq_len. Longest input; sizes the filter grid
  emb_dim: int = 5                        # positional features of the implicit filter (odd, >= 3)
  filter_order: int = 64                  # width of the implicit-filter MLP
  short_filter_order: int = 3             # -hf name; the original code hard-codes 3
  hyena_order: int = 2                    # every release is order 2
  num_inner_mlps: int = 2
  activation_freq: float = 10.0           # original: layer.w; initial value of the Sin freq
  modulate: bool = True
  shift: float = 0.05                     # 0.05: standalone/-hf inference; 0.0: training code
  embed_dropout: float = 0.1
  resid_dropout: float = 0.0
  hyena_dropout: float = 0.0
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  # Execution policy (not part of the official config).
  dtype: str = "float32"                  # compute dtype of projections/MLP; FFT, norms and the
                                          # residual stream always stay float32
  conv_impl: ConvImpl = "fft"
  # What conv_impl='pallas' stores its spectra in between kernels (past 2k tokens on GPU, 8k on
  # TPU): bfloat16 halves its HBM traffic at bf16-level error (pallas_conv.long_conv's
  # spectra_dtype). The fft path stores none.
  pallas_spectra_dtype: SpectraDtype = "float32"
  remat: RematPolicy = "none"             # jax.checkpoint per block: none | block | dots |
                                          # offload (block, inputs kept in host memory)
  scan_layers: bool = False               # run blocks with lax.scan (one block's temporaries live)

  def __post_init__(self):
    errors = []
    for name in ("d_model", "n_layer", "d_inner", "vocab_size", "pad_vocab_size_multiple",
                 "filter_order", "num_inner_mlps"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        errors.append(f"{name} must be a positive int, got {value!r}")
    if not isinstance(self.l_max, int) or self.l_max < 2:
      errors.append(f"l_max must be an int >= 2, got {self.l_max!r}")
    if not isinstance(self.emb_dim, int) or self.emb_dim < 3 or self.emb_dim % 2 == 0:
      errors.append(f"emb_dim must be an odd int >= 3 (t plus cos/sin pairs), got {self.emb_dim!r}")
    if self.hyena_order != 2:
      errors.append(f"hyena_order={self.hyena_order} is not supported: every released HyenaDNA "
                    "model is order 2 and the official code disagrees with itself for order > 2")
    if self.short_filter_order != 3:
      errors.append(f"short_filter_order={self.short_filter_order}: the official model hard-codes "
                    "a 3-tap short filter")
    for name in ("embed_dropout", "resid_dropout", "hyena_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        errors.append(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
    if self.resid_dropout or self.hyena_dropout:
      errors.append("resid_dropout and hyena_dropout are 0 in every HyenaDNA recipe and are not "
                    "implemented; set them to 0.0")
    if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
      errors.append(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
    if self.dtype not in _DTYPES:
      errors.append(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
    if self.conv_impl not in CONV_IMPLS:
      # Every path honours both (the model, context parallelism, generation's prefill; a decoding
      # step is a dot product, not a convolution), so only unknown values are refused here.
      errors.append(f"conv_impl must be one of {CONV_IMPLS} (XLA FFT, or the Pallas kernel of "
                    f"hyena_jax.model.kernels), got {self.conv_impl!r}")
    if self.pallas_spectra_dtype not in SPECTRA_DTYPES:
      errors.append(f"pallas_spectra_dtype must be one of {SPECTRA_DTYPES}, got "
                    f"{self.pallas_spectra_dtype!r}")
    if self.remat not in REMAT_POLICIES:
      errors.append(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.remat == "offload" and not self.scan_layers:
      errors.append("remat='offload' keeps the scanned blocks' inputs in host memory: it needs "
                    "scan_layers=True")
    if errors:
      raise InputError("invalid HyenaConfig:\n  " + "\n  ".join(errors))

  @property
  def padded_vocab_size(self) -> int:
    m = self.pad_vocab_size_multiple
    return (self.vocab_size + m - 1) // m * m

  def replace(self, **changes: Any) -> "HyenaConfig":
    return from_dict({**dataclasses.asdict(self), **changes})

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def from_dict(values: Mapping[str, Any]) -> HyenaConfig:
  """Builds a config, refusing unknown fields by name (typos must not pass silently)."""
  known = {f.name for f in dataclasses.fields(HyenaConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    guesses = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
    hint = "".join(f"; did you mean {g[0]!r} for {u!r}?" for u, g in guesses.items() if g)
    raise InputError(f"unknown HyenaConfig field(s) {unknown}{hint}; known fields: "
                     f"{sorted(known)}")
  return HyenaConfig(**values)


# Keys of the official configs that carry no information for inference or that we do not model.
_IGNORED_OFFICIAL = {
    "resid_dropout", "fused_mlp", "fused_dropout_add_ln", "residual_in_fp32", "return_hidden_state",
    "checkpoint_mixer", "checkpoint_mlp", "_name_", "lr", "wd", "lr_pos_emb", "local_order",
    "model_type", "architectures", "auto_map", "torch_dtype", "transformers_version",
    "pad_token_id", "tie_word_embeddings", "train_freq", "use_bias", "hyena_filter_dropout",
    "initializer_range", "layer_norm_epsilon", "name_or_path", "_name_or_path", "bos_token_id",
    "eos_token_id", "use_cache", "num_labels", "id2label", "label2id", "problem_type",
    "n_classes", "d_output", "use_head",
}


def from_official(cfg: Mapping[str, Any], **overrides: Any) -> HyenaConfig:
  """Reads an official `config.json`: original (nested `layer` dict) or -hf style.

  Unknown keys are refused so that a model feature we do not implement never loads silently.
  `shift` is not in any official config: pass it as an override (0.05 is the -hf default).
  """
  cfg = dict(cfg)
  layer = dict(cfg.pop("layer", {}) or {})
  values: dict[str, Any] = {}
  rename = {"max_seq_len": "l_max", "w": "activation_freq", "hyena_dropout": "hyena_dropout"}
  unknown = []
  for source in (cfg, layer):
    for key, value in source.items():
      target = rename.get(key, key)
      if key == "layer_norm_epsilon":
        values["layer_norm_epsilon"] = float(value)
      elif key == "initializer_range":
        values["initializer_range"] = float(value)
      elif key == "resid_dropout":
        if value:
          raise InputError(f"resid_dropout={value} is not supported (every release uses 0)")
      elif key == "modulate":
        values["modulate"] = bool(value)
      elif key in ("use_bias", "train_freq") and not value:
        raise InputError(f"{key}=false is not supported (every release uses true)")
      elif key == "hyena_filter_dropout" and value:
        raise InputError(f"hyena_filter_dropout={value} is not supported")
      elif key in _IGNORED_OFFICIAL:
        continue
      elif target in {f.name for f in dataclasses.fields(HyenaConfig)}:
        values[target] = value
      else:
        unknown.append(key)
  if unknown:
    raise InputError(f"official config has key(s) this port does not understand: {sorted(unknown)}")
  if "activation_freq" in values:
    values["activation_freq"] = float(values["activation_freq"])
  values.update(overrides)
  return from_dict(values)


def load_official(path: str | os.PathLike, **overrides: Any) -> HyenaConfig:
  with open(path) as f:
    return from_official(json.load(f), **overrides)


def _release(d_model: int, n_layer: int, l_max: int) -> HyenaConfig:
  return HyenaConfig(d_model=d_model, n_layer=n_layer, d_inner=4 * d_model, l_max=l_max)


# The seven released checkpoints (LongSafari/hyenadna-<name>-seqlen[-hf]); l_max = max_len + 2.
RELEASED: dict[str, HyenaConfig] = {
    "tiny-1k": _release(128, 2, 1_026),
    "tiny-1k-d256": _release(256, 2, 1_026),
    "tiny-16k-d128": _release(128, 2, 16_386),
    "small-32k": _release(256, 4, 32_770),
    "medium-160k": _release(256, 8, 160_002),
    "medium-450k": _release(256, 8, 450_002),
    "large-1m": _release(256, 8, 1_000_002),
}


def released(name: str, **overrides: Any) -> HyenaConfig:
  if name not in RELEASED:
    raise InputError(f"unknown released model {name!r}; choose one of {sorted(RELEASED)}")
  return RELEASED[name].replace(**overrides) if overrides else RELEASED[name]
