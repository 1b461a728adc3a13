"""Orbax checkpoints of a pytree plus a JSON side-car (iterator state, early
stopping, anything else the loop must resume exactly)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpoints:
  """A folder of step-numbered checkpoints, each a pytree and a JSON dict.

  In a multi-process run every process saves and restores (each writes its
  own shards); the processes meet at barriers named after the step, so the
  folder's name prefixes them: two folders saving the same step at once
  (train.py's `checkpoints` and `best`) must have different names.
  """

  def __init__(self, directory: str, max_to_keep: int):
    directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=os.path.basename(directory))))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, tree: PyTree, meta: dict[str, Any]) -> None:
    """Saves asynchronously; `close` (or the next save) waits for it."""
    self._manager.save(step, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """The checkpoint at `step` (default: latest), shaped, typed and laid out
    like `like`, whatever devices wrote it: a leaf of `like` with a sharding
    (an array, or a ShapeDtypeStruct that has one) is restored onto it, one
    without (a jax.eval_shape result) whole onto this process's first device."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self._manager.directory}')
    abstract = jax.tree.map(_with_sharding, like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        tree=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored['tree'], restored['meta']

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _with_sharding(leaf: Any) -> jax.ShapeDtypeStruct:
  """The restore target of a leaf of `like` (see Checkpoints.restore)."""
  abstract = ocp.utils.to_shape_dtype_struct(leaf)
  if abstract.sharding is not None:
    return abstract
  return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype,
                              sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
