"""The device mesh and what lives where on it: data-parallel batches and
vocab-parallel item tables.

The mesh (`config.mesh`) has two axes. `data` splits every batch along its
first axis (each process loads the rows its devices hold, `process_rows`:
pipeline.TrainBatches and eval_batches slice them, `global_batch` assembles
the global arrays).
`model` splits the item axis of the item tables, so that a catalogue too big
for one device is spread over mesh.model of them (ITEM_AXES): the input
embedding [V, E] (and the CANet router's), the full or sampled softmax kernel
[H, V] and its bias [V], the block embedding's tail tables [size_j, d_j] and
the adaptive softmax's tail outputs [d_j, size_j]. A tied head keeps only its
bias, so it follows the embedding. The small blocks (the adaptive head's
frequent-item block and its projections) and every other parameter are
replicated; the optimizer state is sharded like its parameters.

  mesh = mesh_from_config(config)
  state, shardings = step.create_state(spec, tx, seed, mesh)  # create(), state_shardings()
  train_step = step.jit_train_step(model, tx, log_q, mesh, shardings)
  state, metrics = train_step(state, global_batch(mesh, numpy_batch))

Under jit, XLA's SPMD partitioner splits the computation to follow: logits
[..., V] stay split over `model` (each device computes its items' columns),
the loss's log-sum-exp and target logit are reduced across devices, and
evaluate.make_rank_fn splits each chunk of scored items over `model`
(`constrain` gives the partitioner that hint).

Any catalogue splits: the item tables are cut into model.item_shards equal
parts (ModelSpec.item_shards; the padding is never scored), and mesh.model
must divide model.item_shards (ConfigError otherwise). The padding depends
on item_shards only, not on the mesh, so a checkpoint restores onto any mesh
whose `model` divides it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, TypeVar

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from seqcompress_jax.config import ConfigError

DATA, MODEL = 'data', 'model'

# Parameters split over `model` along their item axis: a pattern of the
# '/'-joined dict keys of the parameter's path -> the position of that axis.
ITEM_AXES = (
    (re.compile(r'(router/)?embed/embedding'), 0),  # nn.Embed [V, E].
    (re.compile(r'embed/tail_\d+_table'), 0),  # BlockEmbedding tail [size_j, d_j].
    (re.compile(r'head/kernel'), 1),  # FullSoftmax, SampledSoftmax [H, V].
    (re.compile(r'head/bias'), 0),  # Their bias [V].
    (re.compile(r'head/tail_\d+_out'), 1),  # AdaptiveSoftmax tail [d_j, size_j].
)

T = TypeVar('T')


# ---------------------------------------------------------------- mesh ------
def mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes from config.mesh (-1 = the devices the other axis
  leaves); raises ConfigError naming the field unless they use all
  `num_devices` devices."""
  sizes = {f'mesh.{axis}': mesh[axis] for axis in (DATA, MODEL)}
  for field, size in sizes.items():
    if not isinstance(size, int) or isinstance(size, bool) or not (size == -1 or size >= 1):
      raise ConfigError(f'{field}: expected an integer >= 1, or -1 (the rest of the '
                        f'devices), got {size!r}')
  if all(size == -1 for size in sizes.values()):
    raise ConfigError('mesh.model: at most one of mesh.data and mesh.model can be -1')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  field = next(f for f, size in sizes.items() if size != -1)  # mesh.data if neither is -1.
  if num_devices % fixed or (-1 not in sizes.values() and fixed != num_devices):
    raise ConfigError(f'{field}: mesh.data x mesh.model = {mesh.data} x {mesh.model} '
                      f'does not use the {num_devices} devices')
  data, model = (num_devices // fixed if size == -1 else size for size in sizes.values())
  return data, model


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: list[jax.Device] | None = None) -> Mesh:
  """The (data, model) mesh of config.mesh over `devices` (default: all),
  after checking that the batch sizes split evenly over `data`."""
  devices = jax.devices() if devices is None else devices
  data, model = mesh_shape(config.mesh, len(devices))
  for field in ('batch_size', 'eval_batch_size'):
    if config.data[field] % data:
      raise ConfigError(f'data.{field}: expected a multiple of the {data} devices of '
                        f'mesh.data, got {config.data[field]}')
  check_item_shards(config.model.item_shards, model)
  return jax.make_mesh((data, model), (DATA, MODEL), devices=devices,
                       axis_types=(AxisType.Auto, AxisType.Auto))


def check_item_shards(item_shards: int, model_size: int) -> None:
  """Raises ConfigError naming model.item_shards unless `model_size`
  (mesh.model) divides it: each device then holds whole parts of every item
  table, and scans its own parts (blocks.AdaptiveSoftmax._scan_tail)."""
  if item_shards % model_size:
    raise ConfigError(f'model.item_shards: expected a multiple of mesh.model = {model_size} '
                      f'(the item tables are cut into model.item_shards equal parts, split '
                      f'over mesh.model devices), got {item_shards}')


# ---------------------------------------------------------------- params ----
def _dict_path(path: tuple) -> str:
  """'a/b/c' from the dict keys of a key path (list and attribute keys dropped)."""
  return '/'.join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def param_spec(path: str, shape: tuple[int, ...], model_size: int) -> P:
  """The PartitionSpec of the parameter at `path` ('head/kernel'): its item
  axis on `model` (ITEM_AXES), else replicated. Raises ConfigError naming
  model.item_shards when `model_size` does not divide that axis."""
  for pattern, axis in ITEM_AXES:
    if pattern.fullmatch(path):
      if shape[axis] % model_size:
        raise ConfigError(f'model.item_shards: the item axis of {path} {tuple(shape)} does '
                          f'not split over mesh.model = {model_size}; expected '
                          f'model.item_shards to be a multiple of it')
      return P(*(MODEL if i == axis else None for i in range(len(shape))))
  return P()


def param_shardings(mesh: Mesh, params: Any) -> Any:
  """NamedShardings (a tree like `params`, arrays or ShapeDtypeStructs) by param_spec."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(_dict_path(path), x.shape,
                                                     mesh.shape[MODEL])), params)


def state_shardings(mesh: Mesh, tx: optax.GradientTransformation, state: Any) -> Any:
  """Shardings of a train state {params, opt_state, step, rng} (step.py):
  parameters by param_spec, their optimizer statistics like them, the rest
  (counts, step, rng) replicated."""
  params = param_shardings(mesh, state['params'])
  whole = replicated(mesh)
  return {'params': params,
          'opt_state': optax.tree_map_params(tx, lambda _, sharding: sharding,
                                             state['opt_state'], params,
                                             transform_non_params=lambda _: whole),
          'step': whole, 'rng': whole}


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` (a jax.eval_shape result) laid out as
  `shardings`: a checkpoint restored onto them arrives already sharded."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of `mesh` (metrics, scalars)."""
  return NamedSharding(mesh, P())


def create(init: Callable[[], T], shardings: Callable[[T], Any]) -> tuple[T, Any]:
  """init() created already sharded, each array straight on its devices:
  shardings(jax.eval_shape(init)) are the jitted init's out_shardings.
  Returns the tree and its shardings."""
  out_shardings = shardings(jax.eval_shape(init))
  return jax.jit(init, out_shardings=out_shardings)(), out_shardings


# ---------------------------------------------------------------- batches ---
def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Every batch array is split along its first axis over `data`."""
  return NamedSharding(mesh, P(DATA))


def process_rows(mesh: Mesh) -> tuple[int, int]:
  """(k, n): the rows of every batch split over `data` that this process
  loads, block k of n equal contiguous blocks (pipeline.TrainBatches and
  eval_batches take them as their process_index and process_count;
  global_batch places them on its devices).

  n is the number of groups of processes holding different rows, not the
  process count: on a mesh whose `model` axis spans processes, several hold
  the same rows (n = 1 when mesh.data = 1). Blocks go to the groups in the
  order of their first position along `data`, so when each process's devices
  are contiguous along `data` the global batch is the batch itself; when
  they interleave (a device order not by process) it is a row permutation of
  it, which changes no loss or metric. Raises ValueError when processes
  hold overlapping or unequal sets of rows."""
  devices = np.moveaxis(mesh.devices, mesh.axis_names.index(DATA), 0)
  positions: dict[int, set[int]] = {}  # process -> its devices' positions along `data`.
  for position, row in enumerate(devices.reshape(mesh.shape[DATA], -1)):
    for device in row:
      positions.setdefault(device.process_index, set()).add(position)
  groups = sorted({tuple(sorted(p)) for p in positions.values()})
  if (sorted(i for group in groups for i in group) != list(range(mesh.shape[DATA]))
      or len({len(group) for group in groups}) > 1):
    raise ValueError(f'the processes hold overlapping or unequal rows along `data`: {groups}')
  return groups.index(tuple(sorted(positions[jax.process_index()]))), len(groups)


def global_batch(mesh: Mesh, batch: Any) -> Any:
  """This process's rows of a batch (numpy arrays, its block by
  process_rows) -> global arrays split over `data`."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def to_host(tree: Any) -> Any:
  """Global arrays (or numpy arrays, each process's rows) -> whole numpy
  arrays on every process."""
  return multihost_utils.process_allgather(tree, tiled=True)


def constrain(x: jax.Array, mesh: Mesh | None, *spec: str | None) -> jax.Array:
  """x laid out as P(*spec) on `mesh` inside jit (a hint to the partitioner);
  x unchanged without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))
