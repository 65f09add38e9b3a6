"""Official PyTorch checkpoints <-> our NNX parameters: the one key map both directions use.

Layouts (detected from the keys, see SPEC section 2):
  * "hf":         `hyena.backbone.*` + `lm_head.weight`   (LongSafari/*-hf model.safetensors)
  * "standalone": `backbone.*` [+ `head.output_transform.*`] (standalone_hyenadna state_dict)
  * "lightning":  `{"state_dict": {"model.backbone.*", "decoder.0.output_transform.*", ...}}`,
                  possibly with the activation-checkpointing `.mixer.layer.` / `.mlp.layer.` level.

The key map is written once in canonical (standalone) names; PyTorch Linear weights are
[out, in] and NNX kernels [in, out]; Conv1d weights [C, 1, K] and our short filter [K, 1, C].
`pos_emb.z`, `pos_emb.t` and `modulation.deltas` are buffers that we recompute; on import they are
checked against the formulas, so a checkpoint with trained positional features is refused.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyena_jax.errors import InputError
from hyena_jax.model import config as config_lib
from hyena_jax.model import hyena
from hyena_jax.model.config import HyenaConfig

Layout = str  # "hf" | "standalone" | "lightning"


LAYOUTS = ("hf", "lightning", "standalone")  # key prefixes: see the module docstring


@dataclasses.dataclass(frozen=True)
class Entry:
  torch_key: str                       # canonical (standalone) name
  path: tuple                          # NNX state path
  to_jax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _t2(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def _conv(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(2, 1, 0))


def key_map(cfg: HyenaConfig, n_classes: int = 0, head_prefix: str = "head") -> list[Entry]:
  """Every trainable tensor: canonical torch key, NNX path and the layout conversion."""
  entries = [Entry("backbone.embeddings.word_embeddings.weight",
                   ("backbone", "word_embeddings", "embedding"), _same, _same)]

  def linear(tkey: str, path: tuple, bias: bool = True) -> Iterator[Entry]:
    yield Entry(f"{tkey}.weight", path + ("kernel",), _t2, _t2)
    if bias:
      yield Entry(f"{tkey}.bias", path + ("bias",), _same, _same)

  def norm(tkey: str, path: tuple) -> Iterator[Entry]:
    yield Entry(f"{tkey}.weight", path + ("scale",), _same, _same)
    yield Entry(f"{tkey}.bias", path + ("bias",), _same, _same)

  n_filter_linears = cfg.num_inner_mlps + 2
  for i in range(cfg.n_layer):
    t, p = f"backbone.layers.{i}", ("backbone", "layers", i)
    m, mp = f"{t}.mixer", p + ("mixer",)
    entries += [*norm(f"{t}.norm1", p + ("norm1",)),
                *linear(f"{m}.in_proj", mp + ("in_proj",)),
                *linear(f"{m}.out_proj", mp + ("out_proj",)),
                Entry(f"{m}.short_filter.weight", mp + ("short_filter", "kernel"), _conv, _conv),
                Entry(f"{m}.short_filter.bias", mp + ("short_filter", "bias"), _same, _same),
                Entry(f"{m}.filter_fn.bias", mp + ("filter_fn", "bias"), _same, _same),
                Entry(f"{m}.filter_fn.implicit_filter.1.freq", mp + ("filter_fn", "freq"),
                      _same, _same)]
    for j in range(n_filter_linears):  # upstream Sequential index 2j; Sin modules in between
      entries += linear(f"{m}.filter_fn.implicit_filter.{2 * j}",
                        mp + ("filter_fn", "implicit_filter", j), bias=j < n_filter_linears - 1)
    entries += [*norm(f"{t}.norm2", p + ("norm2",)),
                *linear(f"{t}.mlp.fc1", p + ("mlp", "fc1")),
                *linear(f"{t}.mlp.fc2", p + ("mlp", "fc2"))]
  entries += norm("backbone.ln_f", ("backbone", "ln_f"))
  if n_classes:
    entries += linear(f"{head_prefix}.output_transform", ("output_transform",))
  return entries


def buffers(cfg: HyenaConfig) -> dict[str, np.ndarray]:
  """The deterministic per-layer buffers upstream stores (canonical names, float32)."""
  z, t = hyena.positional_features(cfg.l_max, cfg.l_max, cfg.emb_dim)
  deltas = hyena.decay_rates(cfg.d_model)
  out = {}
  for i in range(cfg.n_layer):
    f = f"backbone.layers.{i}.mixer.filter_fn"
    out[f"{f}.pos_emb.z"] = np.asarray(z)[None]
    out[f"{f}.pos_emb.t"] = np.asarray(t)[None]
    out[f"{f}.modulation.deltas"] = np.asarray(deltas)[None, None]
  return out


# ------------------------------------------------------------------------------------------------
# Reading files


_IGNORED = re.compile(r"(^|\.)torchmetrics|^(model\.)?(encoder|decoder)\.(?!0\.output_transform)")


_FREQ_ALIAS = re.compile(r"implicit_filter\.(?!1\.)\d*[13579]\.freq$")


def canonicalize(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Layout, str]:
  """Detects the layout and renames keys to canonical standalone names.

  Returns (canonical dict, layout, head prefix). `lm_head.weight` is checked to equal the
  embedding (the head is tied) and dropped; aliased `freq` copies are checked and dropped.
  """
  keys = list(state_dict)
  if any(k.startswith("hyena.backbone.") for k in keys):
    layout, strip = "hf", "hyena."
  elif any(k.startswith("model.backbone.") for k in keys):
    layout, strip = "lightning", "model."
  elif any(k.startswith("backbone.") for k in keys):
    layout, strip = "standalone", ""
  else:
    raise InputError("not a HyenaDNA checkpoint: no key starts with 'hyena.backbone.', "
                     f"'model.backbone.' or 'backbone.' (first keys: {keys[:3]})")
  out: dict[str, np.ndarray] = {}
  head_prefix = "head"
  lm_head = None
  for key, value in state_dict.items():
    if layout == "lightning" and _IGNORED.search(key):
      continue
    name = key[len(strip):] if strip and key.startswith(strip) else key
    if name == "lm_head.weight":
      lm_head = value
      continue
    if name.startswith("decoder.0.output_transform."):
      head_prefix = "decoder.0"
    name = name.replace(".mixer.layer.", ".mixer.").replace(".mlp.layer.", ".mlp.")
    out[name] = value
  if lm_head is not None:
    emb = out.get("backbone.embeddings.word_embeddings.weight")
    if emb is None or emb.shape != lm_head.shape or not np.array_equal(emb, lm_head):
      raise InputError("lm_head.weight differs from the word embeddings; HyenaDNA ties them and "
                       "this port does not support an untied head")
  # The shared Sin freq appears once per activation, at implicit_filter.{2j+1} for
  # j = 0..num_inner_mlps (.1, .3, .5 for the default 2 inner MLPs; .7 with 3).
  for key in [k for k in out if _FREQ_ALIAS.search(k)]:
    ref = out.get(_FREQ_ALIAS.sub("implicit_filter.1.freq", key))
    if ref is None or not np.array_equal(ref, out[key]):
      raise InputError(f"{key} differs from implicit_filter.1.freq; upstream shares one Sin "
                       "frequency across the filter MLP and so does this port")
    del out[key]
  return out, layout, head_prefix


def infer_config(canonical: Mapping[str, np.ndarray], **overrides) -> HyenaConfig:
  """Reads the architecture off tensor shapes (used when no config.json is at hand)."""
  layer_ids = {int(m.group(1)) for k in canonical if (m := re.match(r"backbone\.layers\.(\d+)\.", k))}
  f0 = "backbone.layers.0.mixer.filter_fn"
  try:
    emb = canonical["backbone.embeddings.word_embeddings.weight"]
    first = canonical[f"{f0}.implicit_filter.0.weight"]
    n_linear = len({k for k in canonical if re.match(rf"{re.escape(f0)}\.implicit_filter\.\d+\.weight$", k)})
    values = dict(
        d_model=emb.shape[1], n_layer=len(layer_ids),
        d_inner=canonical["backbone.layers.0.mlp.fc1.weight"].shape[0],
        filter_order=first.shape[0], emb_dim=first.shape[1], num_inner_mlps=n_linear - 2)
    if f"{f0}.pos_emb.z" in canonical:
      values["l_max"] = canonical[f"{f0}.pos_emb.z"].shape[1]
  except KeyError as e:
    raise InputError(f"cannot infer the architecture: tensor {e} is missing") from e
  values.update(overrides)
  if "l_max" not in values:
    raise InputError("this checkpoint stores no pos_emb.z, so l_max is unknown: pass l_max")
  return config_lib.from_dict(values)


def load_into(model: nnx.Module, cfg: HyenaConfig, canonical: Mapping[str, np.ndarray], *,
              n_classes: int = 0, head_prefix: str = "head", source: str = "checkpoint"
              ) -> nnx.Module:
  """Copies canonical tensors into `model` in place (also an `nnx.eval_shape` model), refusing
  unknown, missing or misshapen keys. Returns the model."""
  entries = key_map(cfg, n_classes, head_prefix)
  expected_buffers = buffers(cfg)
  known = {e.torch_key for e in entries} | set(expected_buffers)
  unknown = sorted(set(canonical) - known)
  if unknown:
    hint = (" (a classification head: load it into a SequenceClassifier)"
            if any("output_transform" in k for k in unknown) else "")
    raise InputError(f"{source}: {len(unknown)} key(s) this port does not map{hint}: "
                     f"{unknown[:8]}")
  missing = sorted(e.torch_key for e in entries if e.torch_key not in canonical)
  if missing:
    raise InputError(f"{source}: {len(missing)} required key(s) missing: {missing[:8]}")
  for key, expected in expected_buffers.items():
    if key in canonical:
      got = canonical[key]
      if got.shape != expected.shape:
        # Which config field sizes the differing axis: deltas [1, 1, d_model],
        # z [1, l_max, emb_dim], t [1, l_max, 1].
        axis = next(i for i, (a, b) in enumerate(zip(got.shape, expected.shape)) if a != b) \
            if len(got.shape) == len(expected.shape) else 1
        field = ("d_model" if key.endswith("deltas") else
                 "emb_dim" if key.endswith(".z") and axis == 2 else "l_max")
        raise InputError(f"{source}: {key} has shape {got.shape}, expected {expected.shape} for "
                         f"{field}={getattr(cfg, field)}; the config's {field} does not match "
                         f"the checkpoint ({got.shape[axis]} there)")
      if not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
        raise InputError(f"{source}: {key} differs from the deterministic buffer "
                         f"(max |diff| {np.abs(got - expected).max():.2e}); trained positional "
                         "features or decay rates are not supported")
  graphdef, state = nnx.split(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  values = {}
  for e in entries:
    value = e.to_jax(np.asarray(canonical[e.torch_key]))
    if e.path not in flat:
      raise InputError(f"{source}: model has no parameter at {'.'.join(map(str, e.path))}")
    var = flat[e.path]
    if tuple(var.shape) != value.shape:
      raise InputError(f"{source}: {e.torch_key} has shape {canonical[e.torch_key].shape}, the "
                       f"model expects {tuple(var.shape)} (after layout conversion) at "
                       f"{'.'.join(map(str, e.path))}; check d_model/n_layer/d_inner/filter_order")
    values[e.path] = jnp.asarray(value, dtype=var.dtype)
  # Works for concrete and abstract (nnx.eval_shape) models alike: values replace whole leaves.
  nnx.replace_by_pure_dict(state, _unflatten(values))
  nnx.update(model, state)
  return model


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree
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
  for e in key_map(cfg, n_classes, head_prefix):
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
      one = buffers(dataclasses.replace(cfg, n_layer=1))
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
