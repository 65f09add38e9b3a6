"""A minimal PyTorch HyenaDNA with exactly the HuggingFace "-hf" parameter names.

Written from the specification (SPEC section 1), not from the JAX model, so that it is a second,
independent check of the maths: exported weights run here without any other code, and the golden
fixtures must come out of this module too. Inference only (no dropout, no training tricks).

    model = torch_reference.from_pretrained("exported_dir")   # config.json + weights
    logits = model(torch.tensor(ids))                          # ids: [B, L] int64 -> [B, L, 16]

State-dict keys (d = d_model): `hyena.backbone.embeddings.word_embeddings.weight`,
`hyena.backbone.layers.{i}.{norm1,mixer,norm2,mlp}.*`, `hyena.backbone.ln_f.*` and `lm_head.weight`
(`HyenaDNAForCausalLM`), or `head.output_transform.*` instead of `lm_head` (`HyenaDNAClassifier`,
mean pooling over all positions as the standalone model's head). The shared Sin frequency is one
module registered at `implicit_filter.1/.3/.5`, so `state_dict()` lists the three aliases while the
-hf files store only `.1.freq`: `load_weights` accepts either.

Requires PyTorch: `pip install 'hyena_jax[torch]'`.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Mapping

try:
  import torch
  from torch import nn
  from torch.nn import functional as F
except ImportError as e:  # the JAX package never imports this module itself
  raise ImportError("hyena_jax.interop.torch_reference needs PyTorch: "
                    "pip install 'hyena_jax[torch]'") from e


# ------------------------------------------------------------------------------------------------
# Configuration: the fields of an -hf config.json (an original-style config is translated).


def _hf_fields(config: Mapping[str, Any]) -> dict[str, Any]:
  """Reads either official config.json style into the -hf field names used below."""
  c = dict(config)
  layer = dict(c.pop("layer", {}) or {})
  out = {
      "d_model": c["d_model"], "n_layer": c["n_layer"],
      "d_inner": c.get("d_inner", 4 * c["d_model"]),
      "vocab_size": c.get("vocab_size", 12),
      "pad_vocab_size_multiple": c.get("pad_vocab_size_multiple", 8),
      "max_seq_len": c.get("max_seq_len", layer.get("l_max")),
      "emb_dim": c.get("emb_dim", layer.get("emb_dim", 3)),
      "filter_order": c.get("filter_order", layer.get("filter_order", 64)),
      "num_inner_mlps": c.get("num_inner_mlps", layer.get("num_inner_mlps", 2)),
      "activation_freq": c.get("activation_freq", layer.get("w", 1)),
      "layer_norm_epsilon": c.get("layer_norm_epsilon", 1e-5),
      "modulate": layer.get("modulate", True),
      # Not in any official config; the standalone / -hf code hard-codes 0.05.
      "shift": c.get("shift", layer.get("shift", 0.05)),
  }
  if out["max_seq_len"] is None:
    raise ValueError("config.json has neither max_seq_len (-hf style) nor layer.l_max (original)")
  if c.get("hyena_order", layer.get("order", 2)) != 2:
    raise ValueError("only order-2 Hyena (every HyenaDNA release) is implemented here")
  return out


# ------------------------------------------------------------------------------------------------
# Modules (names mirror the upstream attribute names so that state-dict keys match).


class Sin(nn.Module):
  """sin(freq * x) with a learnable per-channel frequency `freq`: [1, F]."""

  def __init__(self, dim: int, w: float):
    super().__init__()
    self.freq = nn.Parameter(torch.full((1, dim), float(w)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
  """Buffers z: [1, l_max, emb_dim] = [t, cos(f w), -sin(f w)] and t: [1, l_max, 1] (SPEC 1.5)."""

  def __init__(self, emb_dim: int, l_max: int):
    super().__init__()
    t = torch.linspace(0, 1, l_max)[None, :, None]                     # i / (l_max - 1)
    bands = (emb_dim - 1) // 2
    w = 2 * math.pi * torch.arange(l_max, dtype=torch.float32)[None, :, None] / l_max
    f = torch.linspace(1e-4, bands - 1, bands)[None, None]
    phase = torch.exp(-1j * f * w)                                     # e^{-i f w}
    z = torch.cat([t, phase.real, phase.imag], dim=-1).float()
    self.register_buffer("z", z)
    self.register_buffer("t", t)

  def forward(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return self.z[:, :length], self.t[:, :length]


class ExponentialModulation(nn.Module):
  """h * (exp(-t |deltas|) + shift), deltas: [1, 1, d] from ln(1e-2)/1.5 to ln(1e-2)/0.3."""

  def __init__(self, d_model: int, shift: float, modulate: bool):
    super().__init__()
    self.shift, self.modulate = shift, modulate
    target = math.log(1e-2)
    self.register_buffer("deltas", torch.linspace(target / 1.5, target / 0.3, d_model)[None, None])

  def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    if not self.modulate:
      return h
    return h * (torch.exp(-t * self.deltas.abs()) + self.shift)


class HyenaFilter(nn.Module):
  """Implicit long filter: `implicit_filter` = Linear, Sin, Linear, Sin, ..., Linear (no bias)."""

  def __init__(self, d_model: int, emb_dim: int, filter_order: int, num_inner_mlps: int,
               w: float, l_max: int, shift: float, modulate: bool):
    super().__init__()
    self.bias = nn.Parameter(torch.zeros(d_model))                     # the skip term D
    self.pos_emb = PositionalEmbedding(emb_dim, l_max)
    sin = Sin(filter_order, w)  # one module (one freq) shared by every activation
    layers: list[nn.Module] = [nn.Linear(emb_dim, filter_order), sin]
    for _ in range(num_inner_mlps):
      layers += [nn.Linear(filter_order, filter_order), sin]
    layers.append(nn.Linear(filter_order, d_model, bias=False))
    self.implicit_filter = nn.Sequential(*layers)
    self.modulation = ExponentialModulation(d_model, shift, modulate)

  def forward(self, length: int) -> torch.Tensor:
    """Returns k: [d, length]."""
    z, t = self.pos_emb(length)
    h = self.modulation(t, self.implicit_filter(z))                    # [1, length, d]
    return h[0].transpose(0, 1)


def causal_fft_conv(u: torch.Tensor, k: torch.Tensor, d_skip: torch.Tensor) -> torch.Tensor:
  """y[c, t] = sum_{s<=t} k[c, t-s] u[c, s] + D[c] u[c, t]; u: [B, d, L], k: [d, L].

  The FFT runs in float32 with n = 2L >= 2L-1, so there is no circular wrap-around.
  """
  length = u.shape[-1]
  n = 2 * length
  uf = torch.fft.rfft(u.float(), n=n)
  kf = torch.fft.rfft(k.float(), n=n)
  y = torch.fft.irfft(uf * kf, n=n)[..., :length]
  return (y + u.float() * d_skip.float()[:, None]).to(u.dtype)


class HyenaOperator(nn.Module):
  """Order 2: in_proj -> causal depthwise conv(3) -> x0|x1|v -> out_proj(x0 (k * x1v + D x1v))."""

  def __init__(self, d_model: int, filter_kwargs: dict):
    super().__init__()
    self.d_model = d_model
    self.in_proj = nn.Linear(d_model, 3 * d_model)
    self.out_proj = nn.Linear(d_model, d_model)
    self.short_filter = nn.Conv1d(3 * d_model, 3 * d_model, kernel_size=3, groups=3 * d_model,
                                  padding=2)
    self.filter_fn = HyenaFilter(d_model, **filter_kwargs)

  def forward(self, u: torch.Tensor) -> torch.Tensor:
    length = u.shape[1]
    uc = self.in_proj(u).transpose(1, 2)                               # [B, 3d, L]
    uc = self.short_filter(uc)[..., :length]                           # keep first L: causal
    x0, x1, v = uc.split(self.d_model, dim=1)
    v = v * x1
    v = causal_fft_conv(v, self.filter_fn(length), self.filter_fn.bias)
    return self.out_proj((v * x0).transpose(1, 2))


class Mlp(nn.Module):
  def __init__(self, d_model: int, d_inner: int):
    super().__init__()
    self.fc1 = nn.Linear(d_model, d_inner)
    self.fc2 = nn.Linear(d_inner, d_model)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
  """Pre-norm: x + mixer(norm1(x)), then x + mlp(norm2(x))."""

  def __init__(self, d_model: int, d_inner: int, eps: float, filter_kwargs: dict):
    super().__init__()
    self.norm1 = nn.LayerNorm(d_model, eps=eps)
    self.mixer = HyenaOperator(d_model, filter_kwargs)
    self.norm2 = nn.LayerNorm(d_model, eps=eps)
    self.mlp = Mlp(d_model, d_inner)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.mixer(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class Embeddings(nn.Module):
  def __init__(self, vocab: int, d_model: int):
    super().__init__()
    self.word_embeddings = nn.Embedding(vocab, d_model)


class Backbone(nn.Module):
  def __init__(self, c: Mapping[str, Any]):
    super().__init__()
    m = c["pad_vocab_size_multiple"]
    self.padded_vocab = (c["vocab_size"] + m - 1) // m * m
    self.l_max = c["max_seq_len"]
    self.embeddings = Embeddings(self.padded_vocab, c["d_model"])
    filter_kwargs = dict(emb_dim=c["emb_dim"], filter_order=c["filter_order"],
                         num_inner_mlps=c["num_inner_mlps"], w=c["activation_freq"],
                         l_max=c["max_seq_len"], shift=c["shift"], modulate=c["modulate"])
    self.layers = nn.ModuleList(
        [Block(c["d_model"], c["d_inner"], c["layer_norm_epsilon"], filter_kwargs)
         for _ in range(c["n_layer"])])
    self.ln_f = nn.LayerNorm(c["d_model"], eps=c["layer_norm_epsilon"])

  def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
    """input_ids: [B, L] -> hidden after ln_f [B, L, d] (and the residual stream per block)."""
    if input_ids.shape[-1] > self.l_max:
      raise ValueError(f"sequence length {input_ids.shape[-1]} exceeds max_seq_len {self.l_max}")
    x = self.embeddings.word_embeddings(input_ids)
    per_block = []
    for block in self.layers:
      x = block(x)
      per_block.append(x)
    hidden = self.ln_f(x)
    return (hidden, per_block) if output_hidden_states else hidden


class HyenaDNAModel(nn.Module):
  def __init__(self, c: Mapping[str, Any]):
    super().__init__()
    self.backbone = Backbone(c)

  def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
    return self.backbone(input_ids, output_hidden_states)


class HyenaDNAForCausalLM(nn.Module):
  """Keys `hyena.backbone.*` + `lm_head.weight` (the -hf layout). logits: [B, L, padded vocab]."""

  def __init__(self, config: Mapping[str, Any]):
    super().__init__()
    self.config = _hf_fields(config)
    self.hyena = HyenaDNAModel(self.config)
    self.lm_head = nn.Linear(self.config["d_model"], self.hyena.backbone.padded_vocab, bias=False)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    return self.lm_head(self.hyena(input_ids))


class HyenaDNAClassifier(nn.Module):
  """Keys `hyena.backbone.*` + `head.output_transform.*`; class logits = Linear(mean over L)."""

  def __init__(self, config: Mapping[str, Any], n_classes: int):
    super().__init__()
    self.config = _hf_fields(config)
    self.hyena = HyenaDNAModel(self.config)
    self.head = nn.Module()
    self.head.output_transform = nn.Linear(self.config["d_model"], n_classes)

  def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
    return self.head.output_transform(self.hyena(input_ids).mean(dim=1))


# ------------------------------------------------------------------------------------------------
# Loading


_FREQ_ALIAS = re.compile(r"implicit_filter\.(?!1\.)\d*[13579]\.freq$")  # .3, .5, .7, ...


def to_hf_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Renames standalone (`backbone.*`) and Lightning (`model.backbone.*`, `.mixer.layer.`,
  `decoder.0.output_transform.*`) keys to this module's names; drops freq aliases and
  Lightning bookkeeping entries."""
  out = {}
  for key, value in state_dict.items():
    name = key
    if name.startswith("model."):
      name = name[len("model."):]
    if name.startswith("decoder.0.output_transform."):
      name = "head." + name[len("decoder.0."):]
    elif name.startswith("backbone."):
      name = "hyena." + name
    elif not name.startswith(("hyena.backbone.", "lm_head.", "head.output_transform.")):
      continue  # torchmetrics state, encoder, ...
    name = name.replace(".mixer.layer.", ".mixer.").replace(".mlp.layer.", ".mlp.")
    if _FREQ_ALIAS.search(name):
      continue
    out[name] = value
  return out


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
  """Strict load of an -hf-named state dict; the `.{2j+1}.freq` aliases of `.1.freq` may be absent
  (the model's own keys say which exist: .3 and .5 for num_inner_mlps=2, .3 for 1, ...)."""
  state = to_hf_keys(state_dict)
  for key in model.state_dict():
    if _FREQ_ALIAS.search(key):
      state[key] = state[_FREQ_ALIAS.sub("implicit_filter.1.freq", key)]
  if isinstance(model, HyenaDNAForCausalLM) and "lm_head.weight" not in state:
    state["lm_head.weight"] = state["hyena.backbone.embeddings.word_embeddings.weight"]  # tied
  model.load_state_dict(state, strict=True)


def _read(path: str) -> dict[str, torch.Tensor]:
  if path.endswith(".safetensors"):
    from safetensors.torch import load_file
    return load_file(path)
  obj = torch.load(path, map_location="cpu", weights_only=True)
  return obj["state_dict"] if "state_dict" in obj else obj


def from_pretrained(path: str | os.PathLike) -> nn.Module:
  """Builds and loads a model from a directory holding config.json and one weights file
  (model.safetensors, weights.pt or weights.ckpt), in eval mode."""
  path = os.fspath(path)
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  for name in ("model.safetensors", "weights.safetensors", "weights.pt", "weights.ckpt",
               "pytorch_model.bin"):
    if os.path.isfile(os.path.join(path, name)):
      state = to_hf_keys(_read(os.path.join(path, name)))
      break
  else:
    raise FileNotFoundError(f"no model.safetensors, weights.pt or weights.ckpt in {path}")
  if "head.output_transform.weight" in state:
    model = HyenaDNAClassifier(config, state["head.output_transform.weight"].shape[0])
  else:
    model = HyenaDNAForCausalLM(config)
  load_weights(model, state)
  return model.eval()
