"""One training step and what it needs: schedule, optimizer, initial state,
and CANet's routed objective.

Train state is a plain dict {params, opt_state, step, rng}; the step's rng is
`rng` folded with `step`, so that a resumed run draws the same numbers. With
optim.ema_decay the optimizer state also holds a moving average of the
parameters (`average_params`), which `eval_params` returns for evaluation. On a
device mesh, `create_state` makes it already sharded and `jit_train_step`
compiles the step for that layout (sharding.py). A
routed model (CANet) keeps its router's parameters at params['router'], next
to the Recommender's 'embed', 'backbone' and 'head' (which the Recommender
ignores); one optimizer updates both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from seqcompress_jax import evaluate, sharding
from seqcompress_jax.models import model as model_lib
from seqcompress_jax.models import router as router_lib
from seqcompress_jax.models import routing
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
  if optim.ema_decay:
    parts.append(average_params(optim.ema_decay))
  return optax.chain(*parts)


class AverageState(NamedTuple):
  """average_params' state: updates seen, and the parameters' moving average."""
  count: jax.Array
  average: Any


def average_params(decay: float) -> optax.GradientTransformation:
  """Passes updates through unchanged and keeps an exponential moving average
  of the updated parameters (Polyak averaging), to be placed last in a chain.
  The decay at update t is min(decay, (1 + t) / (10 + t)), so that the early
  average is not dominated by the initial parameters."""

  def init(params):
    return AverageState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.copy, params))

  def update(updates, state, params):
    count = state.count.astype(jnp.float32)
    rate = jnp.minimum(decay, (1 + count) / (10 + count))
    new = optax.apply_updates(params, updates)
    average = jax.tree.map(lambda a, p: rate * a + (1 - rate) * p, state.average, new)
    return updates, AverageState(state.count + 1, average)

  return optax.GradientTransformation(init, update)


def eval_params(state: State) -> dict:
  """The parameters to evaluate: the moving average when the optimizer keeps
  one (optim.ema_decay > 0), else the trained parameters."""
  found = [s for s in jax.tree.leaves(state['opt_state'],
                                      is_leaf=lambda x: isinstance(x, AverageState))
           if isinstance(s, AverageState)]
  return found[0].average if found else state['params']


def init_params(spec: ModelSpec, seed: int) -> dict:
  """New parameters from `seed`: the Recommender's, plus 'router' when the
  model is routed (the Recommender's are the same either way)."""
  rng = jax.random.key(seed)
  params = model_lib.init(spec, rng)
  if spec.routed:
    params['router'] = router_lib.init(spec, jax.random.fold_in(rng, 2))
  return params


def init_state(spec: ModelSpec, tx: optax.GradientTransformation, seed: int) -> State:
  """A new train state: parameters from `seed`, the step's rng from it too."""
  params = init_params(spec, seed)
  return {'params': params, 'opt_state': tx.init(params),
          'step': jnp.zeros((), jnp.int32),
          'rng': jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))}


def create_state(spec: ModelSpec, tx: optax.GradientTransformation, seed: int,
                 mesh: Mesh) -> tuple[State, Any]:
  """init_state created already sharded on `mesh` (sharding.state_shardings),
  and its shardings. Raises ConfigError unless mesh.model divides
  spec.item_shards."""
  sharding.check_item_shards(spec.item_shards, mesh.shape[sharding.MODEL])
  return sharding.create(functools.partial(init_state, spec, tx, seed),
                         functools.partial(sharding.state_shardings, mesh, tx))


def last_state(model: Recommender, params: dict, inputs: jax.Array,
               route: routing.Route | jax.Array | None = None) -> Any:
  """evaluate's `encode`: what `score` needs (Recommender.rank_context) from
  the hidden state at the last position, of the full model or of `route`."""
  return model.apply({'params': params}, inputs, method=lambda m, x: m.rank_context(
      m(x, train=False, route=route)[:, -1]))


def item_scores(model: Recommender, params: dict, context: Any, items: jax.Array) -> jax.Array:
  """evaluate's `score`: float32 [B, C] scores of `items` given last_state's context."""
  return model.apply({'params': params}, context, items, method='score')


# ---------------------------------------------------------------- CANet


def choose_routes(spec: ModelSpec, params: dict, inputs: jax.Array,
                  keys: jax.Array | None = None) -> jax.Array:
  """int32 [B]: the route of each row of inputs [B, L] (router params at
  params['router']): the router's argmax or, with one rng key per row
  (`keys` [B]), a Gumbel-sampled route (routing.straight_through's forward)."""
  logits = router_lib.Router(spec).apply({'params': params['router']}, inputs)
  if keys is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  weights = jax.vmap(routing.straight_through)(logits, keys)
  return jnp.argmax(weights, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Canet:
  """CANet's training objective around a routed Recommender (specs/canet.md).

  The router picks each window's route by straight-through Gumbel-softmax;
  the model runs the masked path; the loss adds to L_SR guide_weight *
  L_guide + uniform_weight * L_uni + cost_weight * E_route[cost], cost =
  MACs(route) / MACs(full) (`costs`, per route).
  """
  spec: ModelSpec
  space: routing.RoutingSpace
  costs: np.ndarray  # float64 [R].
  temperature: optax.Schedule
  guide_weight: float
  uniform_weight: float
  cost_weight: float
  guide_k: int
  guide_rank: evaluate.RankFn  # Ranks of the last target under the smallest sub-model.

  def route(self, params: dict, batch: dict[str, jax.Array], step: jax.Array,
            rng: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Route weights [B, R] (one-hot rows) for batch['inputs'], the routing
    losses' weighted sum, and the terms to log."""
    logits = router_lib.Router(self.spec).apply({'params': params['router']},
                                                batch['inputs'])
    temperature = self.temperature(step)
    weights = routing.straight_through(logits, rng, temperature)
    hit = self.guide_hits(params, batch)
    terms = {'guide_loss': routing.guide_loss(self.space, logits, hit),
             'uniform_loss': routing.uniform_loss(logits),
             'expected_cost': routing.expected_cost(logits, self.costs)}
    loss = (self.guide_weight * terms['guide_loss'] + self.uniform_weight
            * terms['uniform_loss'] + self.cost_weight * terms['expected_cost'])
    routed_cost = jax.lax.stop_gradient(weights) @ jnp.asarray(self.costs, jnp.float32)
    return weights, loss, {**terms, 'routed_cost': routed_cost.mean(),
                           'guide_hits': hit.mean(), 'temperature': temperature}

  def guide_hits(self, params: dict, batch: dict[str, jax.Array]) -> jax.Array:
    """bool [B]: the smallest sub-model (no dropout, no gradient) ranks the
    window's last target among its top guide_k items, the window's other
    items (its history) not competing."""
    inputs = batch['inputs']
    ranks = self.guide_rank(jax.lax.stop_gradient(params), {
        'inputs': inputs, 'targets': batch['targets'][:, -1], 'history': inputs})
    return ranks < self.guide_k


def temperature_schedule(canet: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """canet.temperature, constant or (anneal 'exponential') decaying
  geometrically to canet.final_temperature at the last step."""
  if canet.anneal == 'none':
    return optax.constant_schedule(canet.temperature)
  return optax.exponential_decay(canet.temperature, max(1, total_steps),
                                 canet.final_temperature / canet.temperature,
                                 end_value=canet.final_temperature)


def make_canet(spec: ModelSpec, canet: ml_collections.ConfigDict, total_steps: int,
               chunk_size: int, mesh: Mesh | None = None) -> Canet:
  """The objective of the `canet` config section for a routed `spec`; the
  guide ranks all items `chunk_size` at a time (eval.chunk_size), on `mesh`
  when the step runs on one (evaluate.make_rank_fn)."""
  space = routing.RoutingSpace.of(spec)
  model = Recommender(spec)
  guide_rank = evaluate.make_rank_fn(
      functools.partial(last_state, model, route=space.routes[0]),
      functools.partial(item_scores, model), spec.num_items, chunk_size,
      exclude_history=True, mesh=mesh)
  return Canet(spec=spec, space=space, costs=routing.relative_costs(spec, canet.cost_macs),
               temperature=temperature_schedule(canet, total_steps),
               guide_weight=canet.guide_weight, uniform_weight=canet.uniform_weight,
               cost_weight=canet.cost_weight, guide_k=canet.guide_k, guide_rank=guide_rank)


def jit_train_step(model: Recommender, tx: optax.GradientTransformation,
                   log_q: jax.Array | None, mesh: Mesh, state_shardings: Any,
                   canet: Canet | None = None) -> Any:
  """train_step jitted for `mesh`: the state laid out as `state_shardings`
  (create_state's) and donated, the batch split over `data`
  (sharding.global_batch), the metrics replicated."""
  return jax.jit(functools.partial(train_step, model, tx, log_q, canet=canet),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)),
                 donate_argnums=0)


def train_step(model: Recommender, tx: optax.GradientTransformation,
               log_q: jax.Array | None, state: State, batch: dict[str, jax.Array],
               canet: Canet | None = None) -> tuple[State, dict[str, jax.Array]]:
  """One update on the mean NLL over the batch's non-PAD targets. A step with a
  non-finite loss or gradient leaves params and optimizer state unchanged.

  With `canet` (a routed model), every window runs the route its router
  picks (masked path), the loss adds the routing terms, and the metrics add
  'nll' (L_SR) and Canet.route's terms.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
  dropout_rng, sample_rng = jax.random.split(rng)
  targets = batch['targets']
  count = jnp.maximum((targets != 0).sum(), 1)

  def loss_fn(params):
    variables = {'params': params}
    route = routing_loss = None
    if canet is not None:
      route, routing_loss, terms = canet.route(params, batch, state['step'],
                                               jax.random.fold_in(rng, 2))
    hidden = model.apply(variables, batch['inputs'], train=True, route=route,
                         rngs={'dropout': dropout_rng})
    nll = model.apply(variables, hidden, targets, log_q=log_q, method='loss',
                      rngs={'sample': sample_rng})
    loss = nll.sum() / count
    if canet is None:
      return loss, {}
    return loss + routing_loss, {**terms, 'nll': loss}

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = {'params': keep(params, state['params']),
               'opt_state': keep(opt_state, state['opt_state']),
               'step': state['step'] + 1, 'rng': state['rng']}
  return new_state, {'loss': loss, 'grad_norm': grad_norm, 'finite': finite,
                     'targets': count, **terms}
