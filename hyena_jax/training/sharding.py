"""Device meshes and where arrays live on them: the (data, fsdp, sequence) mesh of a run, the FSDP
rule for parameters and the batch sharding. The axes are `model/mesh_axes.py`'s.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hyena_jax.errors import InputError
from hyena_jax.model import mesh_axes

AXES, BATCH_AXES = mesh_axes.AXES, mesh_axes.BATCH_AXES
# Parameters smaller than this stay replicated: sharding them saves nothing and costs collectives.
MIN_FSDP_SIZE = 2 ** 14


def make_mesh(data: int = -1, fsdp: int = 1, sequence: int = 1,
              devices: list | None = None) -> Mesh:
  """A (data, fsdp, sequence) mesh; one axis may be -1 to take the remaining devices.

  With every axis given explicitly the mesh may use fewer devices than exist (the first ones);
  a warning says so.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, sequence]
  if sizes.count(-1) > 1:
    raise InputError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} "
                     f"sequence={sequence}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or (-1 in sizes and len(devices) % known) \
      or known > len(devices):
    raise InputError(f"mesh data={data} x fsdp={fsdp} x sequence={sequence} does not divide "
                     f"the {len(devices)} available devices")
  if -1 not in sizes and known < len(devices):
    logging.warning("mesh %s uses %d of the %d devices; set one axis to -1 to use all",
                    dict(zip(AXES, sizes)), known, len(devices))
    devices = devices[:known]
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, length] arrays: batch split over data x fsdp, length whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_FSDP_SIZE) -> P:
  """Shards the largest axis divisible by the fsdp size (big_vision's "fsdp" rule)."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = MIN_FSDP_SIZE) -> Any:
  """NamedShardings for a tree of arrays/ShapeDtypeStructs (parameters or optimizer state)."""
  fsdp_size = mesh.shape["fsdp"]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), tree)


def check_process_rows(mesh: Mesh) -> None:
  """Multi-process runs: process p must hold rows p*b:(p+1)*b of every global batch.

  Each process reads only that contiguous block of the batch (data/pretraining.py) and
  `jax.make_array_from_process_local_data` places it on the process's devices, so the batch
  axes (data x fsdp) must be split evenly between the processes, in process order, as a mesh
  built from `jax.devices()` is. Not so when, e.g., the sequence axis spans processes (every
  process would then need every row).
  """
  count = jax.process_count()
  if count == 1:
    return
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = shards * count  # a global batch size every shard count divides
  index_map = batch_sharding(mesh).devices_indices_map((rows,))
  for device, (index,) in index_map.items():
    start = index.start or 0
    block = rows // count
    if not device.process_index * block <= start < (device.process_index + 1) * block:
      raise InputError(
          f"mesh {dict(mesh.shape)} over {count} processes: device {device} of process "
          f"{device.process_index} holds batch rows {start}:{index.stop}, outside that "
          f"process's block of rows; the batch axes data x fsdp = {shards} must be split evenly "
          f"between the {count} processes (a multiple of {count}), with sequence parallelism "
          "inside a process")
