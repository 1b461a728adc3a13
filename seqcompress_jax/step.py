"""One training step and what it needs: schedule, optimizer, initial state.

Train state is a plain dict {params, opt_state, step, rng}; the step's rng is
`rng` folded with `step`, so that a resumed run draws the same numbers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from seqcompress_jax.models import model as model_lib
from seqcompress_jax.models.model import Recommender
from seqcompress_jax.models.spec import ModelSpec

State = dict[str, Any]


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Constant, cosine (to 0) or exponential (to decay_rate * lr) over the steps
  after a linear warm-up from 0."""
  lr, warmup = optim.learning_rate, optim.warmup_steps
  decay_steps = max(1, total_steps - warmup)
  if optim.schedule == 'constant':
    schedule = optax.constant_schedule(lr)
  elif optim.schedule == 'cosine':
    schedule = optax.cosine_decay_schedule(lr, decay_steps)
  else:
    schedule = optax.exponential_decay(lr, decay_steps, optim.decay_rate)
  if not warmup:
    return schedule
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), schedule], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """Adam/AdamW on `make_schedule`, global-norm clipping, and weight decay
  (decoupled for AdamW; for Adam an L2 term, i.e. added to the gradient)."""
  schedule = make_schedule(optim, total_steps)
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip else []
  if optim.optimizer == 'adamw':
    parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay))
  else:
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(optim.weight_decay))
    parts.append(optax.adam(schedule))
  return optax.chain(*parts)


def init_state(spec: ModelSpec, tx: optax.GradientTransformation, seed: int) -> State:
  """A new train state: parameters from `seed`, the step's rng from it too."""
  rng = jax.random.key(seed)
  params = model_lib.init(spec, rng)
  return {'params': params, 'opt_state': tx.init(params),
          'step': jnp.zeros((), jnp.int32),
          'rng': jax.random.key_data(jax.random.fold_in(rng, 1))}


def train_step(model: Recommender, tx: optax.GradientTransformation,
               log_q: jax.Array | None, state: State,
               batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
  """One update on the mean NLL over the batch's non-PAD targets. A step with a
  non-finite loss or gradient leaves params and optimizer state unchanged."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
  dropout_rng, sample_rng = jax.random.split(rng)
  targets = batch['targets']
  count = jnp.maximum((targets != 0).sum(), 1)

  def loss_fn(params):
    variables = {'params': params}
    hidden = model.apply(variables, batch['inputs'], train=True,
                         rngs={'dropout': dropout_rng})
    nll = model.apply(variables, hidden, targets, log_q=log_q, method='loss',
                      rngs={'sample': sample_rng})
    return nll.sum() / count

  loss, grads = jax.value_and_grad(loss_fn)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = {'params': keep(params, state['params']),
               'opt_state': keep(opt_state, state['opt_state']),
               'step': state['step'] + 1, 'rng': state['rng']}
  return new_state, {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
                     'targets': count}
