"""The one front door for a trained HyenaDNA: `hyena_jax.load(source)`.

`source` is any of
  * an orbax run of this project (a folder holding `checkpoints/`; `step` picks the checkpoint);
  * an official PyTorch release, as a weights file or a folder holding one (formats.WEIGHT_FILES):
    the HF "-hf" repositories, the standalone state_dict, a Lightning `weights.ckpt`/`last.ckpt`;
    the official `config.json` beside the weights gives the architecture, else the tensor shapes;
  * a Hugging Face Hub repo id such as "LongSafari/hyenadna-tiny-1k-seqlen-hf", fetched with
    `huggingface_hub.snapshot_download` into the Hub cache (`HF_HUB_CACHE`); `revision` pins a
    branch, tag or commit, and with `HF_HUB_OFFLINE=1` only the cache is read.

Every command-line tool (`--model`), fine-tuning and in-context learning (`config.pretrained`)
go through `load`, so a source that works in one works in all.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from typing import Any

from flax import nnx

from hyena_jax import storage
from hyena_jax.errors import InputError, MissingDependencyError, MissingInputError
from hyena_jax.interop import formats, weights
from hyena_jax.model import config as config_lib
from hyena_jax.model.config import HyenaConfig
from hyena_jax.model.hyenadna import HyenaLM, SequenceClassifier, copy_params

# ORG/NAME as the Hub spells repo ids (letters, digits, '-', '_', '.'; no '--' or '..').
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What `load` returns.

  model:     HyenaLM, or SequenceClassifier when the source carries a classification head; in
             eval mode (call `.train()` to fine-tune).
  config:    its HyenaConfig (with the requested dtype/conv_impl).
  kind:      "orbax", or the official layout: "hf" | "standalone" | "lightning".
  path:      the local file or folder read (for a Hub id: the file in the cache snapshot).
  repo_id:   the Hub repo id, when the source was one; else None.
  revision:  the Hub commit the cache snapshot holds; else None.
  step:      the orbax checkpoint step restored; else None.
  n_classes: classes of the classification head (0: a language model).
  pooling:   the head's pooling ("" for a language model; official files do not record it, and
             "mean" is assumed as in `convert`).
  """
  model: HyenaLM | SequenceClassifier
  config: HyenaConfig
  kind: str
  path: str
  repo_id: str | None = None
  revision: str | None = None
  step: int | None = None
  n_classes: int = 0
  pooling: str = ""

  @property
  def where(self) -> str:
    """One line saying where the model came from (for logs)."""
    if self.repo_id:
      return f"{self.repo_id}@{self.revision} ({self.kind}, {self.path})"
    if self.step is not None:
      return f"{self.path} step {self.step} ({self.kind})"
    return f"{self.path} ({self.kind})"


def load(source: str | os.PathLike, *, dtype: str | None = None, conv_impl: str | None = None,
         step: int | None = None, revision: str | None = None, shift: float | None = None,
         config_path: str | os.PathLike | None = None) -> Loaded:
  """Loads a HyenaDNA model from an orbax run, an official file or folder, or a Hub repo id.

  `dtype` ("float32" | "bfloat16" | ...) and `conv_impl` ("fft" | "pallas") change how the model
  computes, not its weights (None keeps the source's). `step` applies to orbax runs, `revision`
  to Hub ids, `shift` (the filter-modulation shift, default 0.05, recorded in no official config)
  and `config_path` (an official config.json other than the one beside the weights) to official
  releases. Bad sources raise InputError/MissingInputError saying what was expected.
  """
  overrides = {k: v for k, v in (("dtype", dtype), ("conv_impl", conv_impl)) if v is not None}
  text = os.fspath(source)
  if not text:
    raise InputError("no model given: pass an orbax run folder, an official weights file or "
                     "folder, or a Hub repo id such as LongSafari/hyenadna-tiny-1k-seqlen-hf")
  remote = storage.is_url(text)
  if remote:
    storage.check_access(text, "--model")
  if remote or os.path.exists(text):
    if revision is not None:
      raise InputError(f"revision={revision!r} only applies to Hub repo ids, and {text} is a "
                       "path")
    if _is_orbax_run(text):
      if shift is not None or config_path is not None:
        raise InputError(f"{text} is an orbax run, whose config records shift and the "
                         "architecture: drop shift and config_path (--shift, --config_json)")
      return _load_orbax(text, step, overrides)
    if remote:
      raise MissingInputError(
          f"{text} holds no orbax run (no checkpoints/ folder in it): a model read from a bucket "
          "must be a run folder written by hyena_jax (main, finetune, icl, convert); copy an "
          f"official weights file to a local disk first (gcloud storage cp {text} .)")
    if step is not None:
      raise InputError(f"step={step} only applies to orbax runs (a folder with checkpoints/), "
                       f"not to {text}")
    return _load_official(find_weights(text), config_path, shift, overrides)
  if looks_like_path(text):
    raise MissingInputError(f"no such file or folder: {text}{_closest_existing(text)}")
  if not is_repo_id(text):
    raise MissingInputError(
        f"model not found: {text} is neither an existing path nor a Hub repo id (ORG/NAME). "
        "Expected an orbax run folder, an official weights file or a folder holding one of "
        f"{', '.join(formats.WEIGHT_FILES)}, or a repo id such as "
        "LongSafari/hyenadna-tiny-1k-seqlen-hf")
  if step is not None:
    raise InputError(f"step={step} only applies to orbax runs, not to the Hub repo {text}")
  snapshot = hub_snapshot(text, revision)
  loaded = _load_official(find_weights(snapshot), config_path, shift, overrides)
  return dataclasses.replace(loaded, repo_id=text,
                             revision=os.path.basename(os.path.normpath(snapshot)))


def is_repo_id(text: str) -> bool:
  """True for a string shaped like a Hub repo id ORG/NAME (checked only when no such path exists)."""
  return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text


_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".json")


def looks_like_path(text: str) -> bool:
  """True for a source meant as a local path, so that a missing one is not taken for a Hub id:
  it starts with ./ ../ / or ~, ends with a file suffix, has more than one slash, or its first
  component exists here (runs/nothere when runs/ exists)."""
  first = text.split("/", 1)[0]
  return (text.startswith(("./", "../", "/", "~")) or text.endswith(_FILE_SUFFIXES)
          or text.count("/") > 1 or ("/" in text and os.path.isdir(first)))


def _closest_existing(text: str) -> str:
  """'; did you mean runs/default?' from what the path's folder holds, or which folder is missing."""
  path = os.path.expanduser(text.rstrip("/"))
  parent = os.path.dirname(path) or "."
  if not os.path.isdir(parent):
    return f" (its folder {parent} does not exist either)"
  names = sorted(os.listdir(parent))
  close = difflib.get_close_matches(os.path.basename(path), names, n=1, cutoff=0.5)
  if close:
    return f"; did you mean {os.path.join(os.path.dirname(text.rstrip('/')), close[0])}?"
  return f"; {parent} holds: {', '.join(names[:10]) or 'nothing'}"


def find_weights(path: str | os.PathLike) -> str:
  """The weights file `path` names, or the first of formats.WEIGHT_FILES inside folder `path`."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise MissingInputError(f"model path not found: {path}")
  for name in formats.WEIGHT_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise MissingInputError(
      f"{path} holds no model: it is neither an orbax run (no checkpoints/ folder) nor holds an "
      f"official weights file ({', '.join(formats.WEIGHT_FILES)}); found "
      f"{sorted(os.listdir(path))[:10]}."
      " Pass the weights file itself, or the run folder")


def hub_snapshot(repo_id: str, revision: str | None = None) -> str:
  """Local folder of the Hub repo's snapshot (config.json + weights), downloaded into the Hub
  cache unless already there. With HF_HUB_OFFLINE set, only the cache is read."""
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top  (only Hub ids need it)
    from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingDependencyError(f"{repo_id} is not a local path; loading it as a Hub repo id "
                                 "needs huggingface_hub (a dependency of hyena_jax): pip install "
                                 "huggingface_hub") from e
  offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
  at = f"{repo_id}" + (f"@{revision}" if revision else "")
  try:
    # Only what `load` reads: a repo may hold both model.safetensors and pytorch_model.bin, and
    # the first found in formats.WEIGHT_FILES order is used.
    # HF_HUB_CACHE and HF_HUB_OFFLINE are read now, not when huggingface_hub was imported.
    return huggingface_hub.snapshot_download(
        repo_id, revision=revision, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        local_files_only=offline, allow_patterns=["config.json", *formats.WEIGHT_FILES])
  except hub_errors.LocalEntryNotFoundError as e:
    if offline:
      raise MissingInputError(f"{at} is not a local path, and as a Hub repo id it is not in the "
                              f"Hub cache ({_hub_cache()}) and HF_HUB_OFFLINE is set: download it "
                              "once online, or point --model at a local copy") from None
    raise MissingInputError(f"{at} is not a local path, and as a Hub repo id it cannot be "
                            f"downloaded and is not cached in {_hub_cache()}: check the path or "
                            f"the network ({e})") from None
  except hub_errors.RepositoryNotFoundError:
    raise MissingInputError(f"{repo_id} is not a local path, and the Hub has no such repo (or it "
                            "is private: log in with `hf auth login`)") from None
  except hub_errors.RevisionNotFoundError:
    raise MissingInputError(f"the Hub repo {repo_id} has no revision {revision!r}; pass a "
                            "branch, tag or commit it has") from None
  except (hub_errors.HfHubHTTPError, ValueError) as e:  # ValueError: HFValidationError
    raise InputError(f"cannot fetch the Hub repo {at}: {e}") from None


def _hub_cache() -> str:
  return os.environ.get("HF_HUB_CACHE") or os.path.join(
      os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub")


def _is_orbax_run(path: str) -> bool:
  return (storage.resolve(path) / "checkpoints").is_dir()


def _load_orbax(path: str, step: int | None, overrides: dict[str, Any]) -> Loaded:
  from hyena_jax.training import checkpoint  # pylint: disable=g-import-not-at-top  (orbax is heavy)
  model, run_config, step = checkpoint.restore_model(path, step)
  cfg = checkpoint.model_config(run_config)
  n_classes, pooling = checkpoint.head_of(run_config)
  if overrides:  # execution fields live in the module tree, not in the (float32) parameters
    cfg = cfg.replace(**overrides)
    abstract = nnx.eval_shape(lambda: checkpoint.build_model(cfg, n_classes, pooling or "mean"))
    model = copy_params(model, abstract)
    model.eval()
  return Loaded(model, cfg, "orbax", path, step=step, n_classes=n_classes, pooling=pooling)


def _load_official(path: str, config_path: str | os.PathLike | None, shift: float | None,
                   overrides: dict[str, Any]) -> Loaded:
  """An official weights file, with `config_path` (default: config.json beside it) or the
  architecture read off the tensor shapes."""
  raw = formats.read_state_dict(path)
  canonical, layout, head_prefix = weights.canonicalize(raw)
  if config_path is None:
    beside = os.path.join(os.path.dirname(path), "config.json")
    config_path = beside if os.path.isfile(beside) else None
  elif not os.path.isfile(config_path):
    raise MissingInputError(f"config file not found: {config_path}")
  if shift is not None:
    overrides = {**overrides, "shift": shift}
  if config_path is not None:
    cfg = config_lib.load_official(config_path, **overrides)
  else:
    cfg = weights.infer_config(canonical, **overrides)
  head_key = f"{head_prefix}.output_transform.weight"
  n_classes = int(canonical[head_key].shape[0]) if head_key in canonical else 0
  # Built abstractly: every parameter is replaced by the checkpoint's, so no random init is spent.
  model = nnx.eval_shape(lambda: SequenceClassifier(cfg, n_classes, rngs=nnx.Rngs(0)) if n_classes
                         else HyenaLM(cfg, rngs=nnx.Rngs(0)))
  weights.load_into(model, cfg, canonical, n_classes=n_classes, head_prefix=head_prefix,
                    source=path)
  model.eval()
  return Loaded(model, cfg, layout, path, n_classes=n_classes,
                pooling="mean" if n_classes else "")
