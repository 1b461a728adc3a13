"""Reading a finished or interrupted run back from its workdir: its config and
its parameters (best checkpoint, else the latest train state's)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from seqcompress_jax import sharding
from seqcompress_jax import step as step_lib
from seqcompress_jax.checkpointing import Checkpoints
from seqcompress_jax.models.spec import ModelSpec


def _tuples(tree: Any) -> Any:
  """JSON lists back to the tuples the config had."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  return tuple(map(_tuples, tree)) if isinstance(tree, list) else tree


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was started with (workdir/config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {workdir} is not a run directory')
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def restore_params(config: ml_collections.ConfigDict, spec: ModelSpec, workdir: str,
                   mesh: Mesh | None = None) -> tuple[dict, str]:
  """The run's best parameters, else those of its latest train state (their
  moving average with optim.ema_decay), and which ('best (step N)' or
  'latest (step N)').

  Without a mesh they come whole onto this process's first device; on a
  `mesh` they come laid out as a run lays them out there
  (sharding.param_shardings: item tables split over `model`), each process
  reading only its shards, whatever mesh wrote them. Raises ConfigError
  unless mesh.model divides spec.item_shards."""
  if mesh is not None:
    sharding.check_item_shards(spec.item_shards, mesh.shape[sharding.MODEL])
  best = Checkpoints(os.path.join(workdir, 'best'), max_to_keep=1)
  if best.latest_step() is not None:
    like = jax.eval_shape(functools.partial(step_lib.init_params, spec, config.seed))
    if mesh is not None:
      like = sharding.with_shardings(like, sharding.param_shardings(mesh, like))
    params, _ = best.restore(like)
    which = f'best (step {best.latest_step()})'
    best.close()
    return params, which
  latest = Checkpoints(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  if latest.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}: train first (--mode=train)')
  tx = step_lib.make_optimizer(config.optim, 1)
  like = jax.eval_shape(functools.partial(step_lib.init_state, spec, tx, config.seed))
  if mesh is not None:
    like = sharding.with_shardings(like, sharding.state_shardings(mesh, tx, like))
  state, _ = latest.restore(like)
  which = f'latest (step {latest.latest_step()})'
  latest.close()
  return step_lib.eval_params(state), which
