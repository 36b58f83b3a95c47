"""Device mesh, state/batch shardings and host-local -> global arrays.

One code path for 1 CPU, 1 GPU, 8 GPUs or a multi-host TPU pod: only the mesh
differs. The mesh has a single axis "data" over every device of every process;
the batch is split over it, the parameters are replicated or, with
`train.fsdp=True`, their largest divisible axis is split over it (FSDP: XLA
all-gathers them where the step needs them). Nothing here branches on
`jax.process_count()`.
"""
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
# Leaves smaller than this stay replicated under FSDP: splitting them saves
# nothing and costs a collective each.
FSDP_MIN_SIZE = 2 ** 14


def create_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ("data",) mesh over all devices (all processes) or `devices`."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes keep the classic GSPMD propagation (jax's default is Explicit).
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape, num_shards: int) -> P:
  """PartitionSpec splitting the largest axis divisible by `num_shards`.

  Args:
    shape: array shape.
    num_shards: size of the "data" axis.

  Returns:
    P() (replicated) when the array is small or no axis divides.
  """
  if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def tree_shardings(mesh, abstract_tree, *, fsdp: bool) -> Any:
  """NamedShardings for a tree of arrays/ShapeDtypeStructs.

  Args:
    mesh: the ("data",) mesh.
    abstract_tree: pytree whose leaves have `.shape`.
    fsdp: False -> all replicated; True -> `fsdp_spec` per leaf.

  Returns:
    Same-structure pytree of NamedSharding.
  """
  n = mesh.shape[DATA_AXIS]

  def one(leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    return NamedSharding(mesh, fsdp_spec(shape, n) if fsdp else P())
  return jax.tree.map(one, abstract_tree)


def global_batch(batch: dict, mesh) -> dict:
  """Host-local numpy batch -> global jax.Arrays split over "data".

  Each process passes its own slice (its `batch_size / process_count` rows);
  the global array is their concatenation in process order.

  Args:
    batch: dict of numpy arrays with a leading per-process batch axis.
    mesh: the ("data",) mesh.

  Returns:
    Dict of jax.Array with the global leading axis.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      batch)


def to_host(tree, mesh) -> Any:
  """Global jax.Arrays -> full numpy arrays on every process."""
  # Re-sharding to replicated makes every process hold every row, so the
  # conversion is valid on multi-host meshes too (no process_count branch).
  tree = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  return jax.tree.map(np.asarray, tree)


def check_batch_size(batch_size: int, mesh, what: str = 'data.batch_size'):
  """Raises a clear error unless the global batch splits over devices and processes."""
  n, p = mesh.shape[DATA_AXIS], jax.process_count()
  if batch_size % n or batch_size % p:
    raise ValueError(f'{what}={batch_size} must be divisible by the number of '
                     f'devices ({n}) and processes ({p})')
