"""Input pipelines: Grain pretraining windows over a genome, and labelled fine-tuning sequences.

Pretraining (`make_pretrain_dataset`), in data-flow order:

    range(n_windows) -> seed -> shuffle (train; reseeded every epoch) -> repeat(num_epochs)
      -> [finite passes: pad with filler indices to a multiple of the global batch]
      -> batch(global_batch_size) of window indices
      -> random_map(this host's rows p*b:(p+1)*b: fetch, offset, reverse complement, tokenize)
      -> to_iter_dataset(reader threads) -> mp_prefetch(num_workers)

Each Grain element is one global batch. Its random_map RNG (seeded by the pipeline seed and the
batch position, so a restored iterator replays it) draws the augmentations of all its rows in a
fixed order, and host p keeps the contiguous block of rows p*b .. (p+1)*b - 1 (b = B / P): the
global batch at step t holds the same windows in the same order, augmented the same way,
whatever the number of hosts. Contiguous blocks are what `to_global_batch` assembles: on a mesh
built from `jax.devices()` (ordered by process), process p's devices hold exactly those rows. Filler rows (finite passes only) are all [PAD] with loss_mask 0, so a
validation pass sees every window exactly once and every host yields the same number of batches.

Augmentation (`rc_aug`, `random_offset`) applies to the "train" split only. Window construction
and the BED/tiling hold-out are documented in `genome.py`.

Labelled data for fine-tuning is `hyena_jax.data.labelled`'s.
"""

from __future__ import annotations

import difflib
import multiprocessing
import os
import pathlib
import struct
from typing import Any, Mapping

import grain
import jax
import ml_collections
import numpy as np

from hyena_jax.data import genome, seqfiles
from hyena_jax.data import tokenizer as tokenizer_lib
from hyena_jax.errors import InputError, MissingInputError

BUNDLED_GENOME = "ecoli_k12_w3110.fa.gz"


_SPLITS = ("train", "valid", "test")


def default_config() -> ml_collections.ConfigDict:
  """Data fields of the training config (`config.data`)."""
  c = ml_collections.ConfigDict()
  # FASTA genome (plain text or bgzip; .fai built on first use); "" = the bundled E. coli genome.
  c.fasta = ""
  # BED of `chrom start end split` rows (HyenaDNA human-sequences.bed); "" = tile the genome.
  c.bed = ""
  # Tiling only: the last valid_fraction of every FASTA record is the "valid" split.
  c.valid_fraction = 0.05
  # Tiling only: tile size in bases; 0 = seq_len + 1 (non-overlapping windows of the run length).
  c.tile_length = 0
  # Grain worker processes; 0 = read in the training process.
  c.num_workers = 0
  # Batches buffered ahead (per worker when num_workers > 0).
  c.prefetch_buffer = 2
  # Threads per process building batches in parallel (pyfaidx reads are locked, numpy is not).
  c.read_threads = 2
  # Train split: reverse-complement each window with probability 0.5 (official rc_aug).
  c.rc_aug = False
  # Train split: seeded random crop inside intervals longer than the window (official: first bases).
  c.random_offset = False
  # Official replace_N_token: N -> [PAD] in inputs and targets.
  c.replace_n = False
  # loss_mask = 0 where the target is [PAD] (official ignore_index=4); False = official default.
  c.mask_pad = False
  # Soft-masked lowercase bases: "upper" = read as the base, "unk" = [UNK] like the official loader.
  c.lowercase = "upper"
  # IUPAC ambiguity codes: "N", "unk" ([UNK]) or "error".
  c.iupac = "N"
  return c


def cache_dir() -> pathlib.Path:
  """$HYENA_JAX_CACHE, else $XDG_CACHE_HOME/hyena_jax, else ~/.cache/hyena_jax."""
  if os.environ.get("HYENA_JAX_CACHE"):
    return pathlib.Path(os.environ["HYENA_JAX_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "hyena_jax"


def bundled_genome() -> str:
  """Path of the bundled E. coli K-12 W3110 chromosome (NC_007779.1, 4,646,332 bp), indexed.

  The package ships it as plain gzip (1.4 MB; pyfaidx cannot index plain gzip, and BGZF would
  need Biopython), so the first call decompresses it into `cache_dir()` and builds the `.fai`,
  both through a temporary file and a rename so concurrent processes never see partial files.
  """
  import pyfaidx  # pylint: disable=g-import-not-at-top

  src = pathlib.Path(__file__).parents[1] / "data_files" / BUNDLED_GENOME  # hyena_jax/data_files
  if not src.is_file():
    raise MissingInputError(f"bundled genome {src} is missing: reinstall hyena_jax (it ships "
                            "as package data) or set data.fasta to a FASTA file")
  with open(src, "rb") as f:  # gzip trailer: uncompressed size mod 2**32
    f.seek(-4, os.SEEK_END)
    size = struct.unpack("<I", f.read(4))[0]
  dst = cache_dir() / src.name[:-3]
  if not dst.is_file() or dst.stat().st_size != size:
    genome.decompress_to(src, dst)
  fai = dst.with_name(dst.name + ".fai")
  if not fai.is_file() or fai.stat().st_mtime < dst.stat().st_mtime:
    tmp = fai.with_name(f"{fai.name}.tmp{os.getpid()}")
    pyfaidx.Faidx(str(dst), indexname=str(tmp)).close()
    os.replace(tmp, fai)
  return str(dst)


def _check_config(cfg: Mapping[str, Any]) -> None:
  expected = set(default_config().keys())
  keys = set(cfg.keys())
  if keys != expected:
    guesses = {k: difflib.get_close_matches(k, expected, n=1) for k in sorted(keys - expected)}
    hint = "".join(f"; did you mean {g[0]!r} for {k!r}?" for k, g in guesses.items() if g)
    raise InputError(f"data config: unknown keys {sorted(keys - expected)}, missing keys "
                     f"{sorted(expected - keys)}{hint}; start from "
                     "hyena_jax.data.default_config()")
  problems = []
  if cfg["lowercase"] not in ("upper", "unk"):
    problems.append(f"lowercase must be 'upper' or 'unk', got {cfg['lowercase']!r}")
  if cfg["iupac"] not in ("N", "unk", "error"):
    problems.append(f"iupac must be 'N', 'unk' or 'error', got {cfg['iupac']!r}")
  for name, low in (("num_workers", 0), ("prefetch_buffer", 1), ("read_threads", 0),
                    ("tile_length", 0)):
    if not isinstance(cfg[name], int) or isinstance(cfg[name], bool) or cfg[name] < low:
      problems.append(f"{name} must be an int >= {low}, got {cfg[name]!r}")
  if not 0.0 < cfg["valid_fraction"] < 1.0:
    problems.append(f"valid_fraction must lie in (0, 1), got {cfg['valid_fraction']!r}")
  if problems:
    raise InputError("data config: " + "; ".join(problems))


class _GlobalBatch(grain.transforms.RandomMap):
  """Window indices of one global batch [B] -> this host's rows p*b:(p+1)*b, tokenized.

  The augmentation draws for all B rows come from Grain's random_map RNG of the global batch
  (seeded by the pipeline seed and the batch position, hence resumable), in a fixed order, so a
  row's window does not depend on the number of hosts. Working per batch rather than per window
  keeps Grain's per-element overhead off the 1k-token path.
  """

  def __init__(self, windows: genome.GenomeWindows, augment: bool, process_index: int,
               process_count: int):
    self.windows = windows
    self.augment = augment
    self.process_index, self.process_count = process_index, process_count

  def random_map(self, element: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    offsets_u = rng.random(element.shape[0])
    flips = rng.random(element.shape[0]) < 0.5
    b = element.shape[0] // self.process_count
    rows = slice(self.process_index * b, (self.process_index + 1) * b)
    if not self.augment:
      return self.windows.batch(element[rows])
    return self.windows.batch(element[rows], offsets_u[rows], flips[rows])


def _check_int(name: str, value: Any, low: int) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
    raise InputError(f"{name} must be an int >= {low}, got {value!r}")
  return int(value)


def make_pretrain_windows(data_cfg: Mapping[str, Any], *, split: str, seq_len: int
                          ) -> genome.GenomeWindows:
  """The split's windows (before shuffling and batching); checks the files in this process."""
  _check_config(data_cfg)
  if split not in _SPLITS:
    raise InputError(f"split must be one of {_SPLITS}, got {split!r}")
  seq_len = _check_int("seq_len", seq_len, 1)
  fasta_path = data_cfg["fasta"] or bundled_genome()
  fasta = seqfiles.open_fasta(fasta_path)  # builds the .fai once, here, before any worker starts
  sizes = seqfiles.chrom_sizes(fasta)
  fasta.close()
  if data_cfg["bed"]:
    intervals = genome.read_bed(data_cfg["bed"], sizes, split)
  else:
    tile = data_cfg["tile_length"] or seq_len + 1
    intervals = genome.tile_genome(sizes, tile, data_cfg["valid_fraction"], split)
  tok = tokenizer_lib.CharacterTokenizer(lowercase=data_cfg["lowercase"], iupac=data_cfg["iupac"])
  return genome.GenomeWindows(
      fasta_path, intervals, seq_len, tok, rc_aug=bool(data_cfg["rc_aug"]),
      random_offset=bool(data_cfg["random_offset"]), replace_n=bool(data_cfg["replace_n"]),
      mask_pad=bool(data_cfg["mask_pad"]))


def make_pretrain_dataset(data_cfg: Mapping[str, Any], *, split: str, seq_len: int,
                          global_batch_size: int, seed: int, process_index: int | None = None,
                          process_count: int | None = None, num_epochs: int | None = None
                          ) -> grain.IterDataset:
  """Grain pipeline of host-local LM batches (see the module docstring).

  Yields {"inputs": int32 [b, seq_len], "targets": int32 [b, seq_len], "loss_mask": float32
  [b, seq_len]} with b = global_batch_size // process_count. Windows hold seq_len + 1 tokens.
  num_epochs=None repeats forever with a fresh seeded shuffle per epoch; an int gives that many
  passes, padded with filler rows (loss_mask 0) to whole global batches. Checkpoint `iter(ds)`
  with `grain.checkpoint.CheckpointSave/CheckpointRestore`; a state saved with W workers needs
  W workers to restore.
  """
  windows = make_pretrain_windows(data_cfg, split=split, seq_len=seq_len)
  global_batch_size = _check_int("global_batch_size", global_batch_size, 1)
  process_count = _check_int("process_count", jax.process_count() if process_count is None
                             else process_count, 1)
  process_index = _check_int("process_index", jax.process_index() if process_index is None
                             else process_index, 0)
  if process_index >= process_count:
    raise ValueError(f"process_index {process_index} must be < process_count {process_count}")
  if global_batch_size % process_count:
    raise InputError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"{process_count} processes; use a multiple of {process_count}")
  if not 0 <= seed < 2**32:
    raise InputError(f"seed must lie in [0, 2**32), got {seed}")
  if num_epochs is not None:
    num_epochs = _check_int("num_epochs", num_epochs, 1)

  ds = grain.MapDataset.range(len(windows)).seed(seed)
  if split == "train":
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  if num_epochs is not None and len(ds) % global_batch_size:
    filler = grain.MapDataset.source([-1] * (-len(ds) % global_batch_size))
    ds = grain.MapDataset.concatenate([ds, filler])
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.random_map(_GlobalBatch(windows, split == "train", process_index, process_count))
  read = grain.ReadOptions(num_threads=data_cfg["read_threads"],
                           prefetch_buffer_size=data_cfg["prefetch_buffer"])
  it_ds = ds.to_iter_dataset(read)
  if data_cfg["num_workers"] > 0:
    if getattr(multiprocessing.current_process(), "_inheriting", False):
      # A spawned Grain worker is re-importing a main module that builds the pipeline at import
      # time: without this error the worker dies quietly and the parent waits forever.
      raise RuntimeError("make_pretrain_dataset with num_workers > 0 ran while a worker process "
                         "was importing the main module: put the script's code under `if "
                         "__name__ == '__main__':` (absl.app.run scripts already are)")
    # Grain's worker processes read absl flags; outside absl.app.run (tests, notebooks) they are
    # not parsed yet, and the defaults are what we want.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg["num_workers"], per_worker_buffer_size=data_cfg["prefetch_buffer"]))
  return it_ds


def to_global_batch(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding
                    ) -> dict[str, jax.Array]:
  """Host-local batch [b, ...] (rows p*b:(p+1)*b of the global batch) -> global jax.Array
  [b * process_count, ...] laid out by `sharding` (the mesh's batch sharding, e.g.
  NamedSharding(mesh, P("data"))). Each process passes only its own rows; no data crosses hosts.
  """
  return {k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v), (v.shape[0] * jax.process_count(),) + tuple(v.shape[1:]))
          for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Fine-tuning sources
# ---------------------------------------------------------------------------------------------
