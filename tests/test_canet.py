"""Tests for CANet's model layer: the routing space, the straight-through route
choice, weight slicing (masked path == sliced path), the router, its losses,
MACs per route, and routed grouped inference."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from seqcompress_jax import profiling
from seqcompress_jax.config import ConfigError
from seqcompress_jax.models import ModelSpec, Recommender, init, routing
from seqcompress_jax.models import router as router_lib
from seqcompress_jax.models.routing import Route, RoutingSpace

V, L = 30, 6
SPACE = dict(route_embed_dims=(8, 16), route_hidden_dims=(8, 16), route_depths=(1, 2))
R = 8
# XLA's count includes elementwise work (LayerNorm, softmax, exact GELU,
# masks): at the sizes below it adds at most ~6.5% (NextItNet H = 32) and
# ~9% (SASRec H = 128), as in test_profiling.
XLA_TOLERANCE = 0.10

# Compilation dominates on CPU: few programs, no backend optimisation.
jit = functools.partial(jax.jit, static_argnums=0,
                        compiler_options={'xla_backend_optimization_level': 0})


def make_spec(backbone: str, **overrides) -> ModelSpec:
  fields = dict(embed_dim=16, hidden_dim=16, max_len=L, dilations=(1, 2), num_layers=2,
                num_heads=2, ffn_dim=32, dropout=0.0, router_dim=8, router_heads=2,
                router_ffn_dim=16, **SPACE)
  return ModelSpec(num_items=V, backbone=backbone, **{**fields, **overrides})


def random_params(shapes, seed: int = 0) -> dict:
  """Normal(0, 0.3) values in the given shapes (LayerNorm scales and biases
  included, so that slicing them matters): no program to compile."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(x.dtype), shapes)


def model_params(spec: ModelSpec, seed: int = 0) -> dict:
  return random_params(jax.eval_shape(functools.partial(init, spec), jax.random.key(0)),
                       seed)


def windows(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded inputs and targets [rows, L] of varied lengths (some empty)."""
  rng = np.random.default_rng(seed)
  items = rng.integers(1, V, (rows, L + 1))
  lengths = rng.integers(0, L + 2, rows)
  items[np.arange(L + 1) < (L + 1 - lengths)[:, None]] = 0
  return items[:, :-1].astype(np.int32), items[:, 1:].astype(np.int32)


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------- spec, space


def test_spec_reads_the_routing_fields():
  cfg = ml_collections.ConfigDict(dict(backbone='sasrec', embed_dim=16, hidden_dim=16,
                                       num_layers=2, ffn_dim=32, route_embed_dims=[8, 16],
                                       route_hidden_dims=[8, 16], route_depths=[1, 2]))
  spec = ModelSpec.from_config(cfg, num_items=V)
  assert spec.routed and spec.route_embed_dims == (8, 16) and spec.depth == 2
  assert spec.input_proj  # Always, in a routed model.
  assert hash(spec) == hash(ModelSpec.from_config(cfg, num_items=V))
  plain = make_spec('nextitnet', route_embed_dims=(), route_hidden_dims=(), route_depths=())
  assert not plain.routed and not plain.input_proj


@pytest.mark.parametrize('backbone, overrides, field', [
    ('nextitnet', dict(route_embed_dims=(16, 8)), 'model.route_embed_dims'),
    ('nextitnet', dict(route_embed_dims=(8,)), 'model.route_embed_dims'),  # Max != 16.
    ('nextitnet', dict(route_hidden_dims=(0, 16)), 'model.route_hidden_dims'),
    ('nextitnet', dict(route_depths=(1, 3)), 'model.route_depths'),  # 2 blocks.
    ('nextitnet', dict(route_depths=()), 'model.route_depths'),  # All three or none.
    ('sasrec', dict(route_hidden_dims=(9, 16)), 'model.route_hidden_dims'),  # 2 heads.
    # 6 / 2 heads is fine, but the FFN width 20 * 6 / 16 is not an integer.
    ('sasrec', dict(route_hidden_dims=(6, 16), ffn_dim=20), 'model.route_hidden_dims'),
    ('sasrec', dict(router_heads=3), 'model.router_heads'),
    ('sasrec', dict(router_dim=0), 'model.router_dim'),
])
def test_spec_rejects_bad_routing_values(backbone, overrides, field):
  with pytest.raises(ConfigError, match=field):
    make_spec(backbone, **overrides)


def test_routes_are_ordered_hidden_depth_embedding():
  space = RoutingSpace.of(make_spec('sasrec'))
  # The public code's loops: for hidden, for depth, for embedding.
  assert space.routes == (Route(8, 8, 1), Route(16, 8, 1), Route(8, 8, 2), Route(16, 8, 2),
                          Route(8, 16, 1), Route(16, 16, 1), Route(8, 16, 2),
                          Route(16, 16, 2))
  assert space.num_routes == R and space.routes[-1] == Route(16, 16, 2)
  weights = np.arange(1.0, R + 1)[None]  # Route r weighs r + 1.
  c_e, c_h, c_d = (np.asarray(c) for c in space.selectors(weights))
  np.testing.assert_array_equal(c_e, [[1 + 3 + 5 + 7, 2 + 4 + 6 + 8]])
  np.testing.assert_array_equal(c_h, [[1 + 2 + 3 + 4, 5 + 6 + 7 + 8]])
  np.testing.assert_array_equal(c_d, [[1 + 2 + 5 + 6, 3 + 4 + 7 + 8]])


# ---------------------------------------------------------------- straight-through


@pytest.mark.parametrize('noise, temperature', [(True, 1.0), (True, 0.5), (False, 1.0)])
def test_straight_through_is_one_hot_forward_with_soft_gradients(noise, temperature):
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, R)), jnp.float32)
  w = np.random.default_rng(1).normal(size=R)
  rng = jax.random.key(2) if noise else None

  y = np.asarray(routing.straight_through(logits, rng, temperature))
  g = np.asarray(jax.random.gumbel(rng, logits.shape)) if noise else 0.0
  z = np.asarray(jax.nn.log_softmax(logits), np.float64) + g
  np.testing.assert_array_equal(y, np.eye(R)[z.argmax(-1)])  # Exactly one-hot.

  grad = np.asarray(jax.grad(lambda l: (routing.straight_through(l, rng, temperature)
                                        * w).sum())(logits))
  # The gradient of sum(w * y_soft), y_soft = softmax(z / T), z = log_softmax(l) + g.
  s = softmax(z / temperature)
  grad_z = s * (w - (s * w).sum(-1, keepdims=True)) / temperature
  expected = grad_z - softmax(np.asarray(logits, np.float64)) * grad_z.sum(-1, keepdims=True)
  assert np.abs(grad).min() > 0
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('backbone', ['nextitnet', 'sasrec'])
def test_router_gets_gradients_through_the_masked_model(backbone):
  spec = make_spec(backbone)
  inputs, targets = windows(8, seed=3)

  @jit
  def loss_and_grads(spec, params, router_params, inputs, targets):
    model, router = Recommender(spec), router_lib.Router(spec)

    def loss(params, router_params):
      logits = router.apply({'params': router_params}, inputs)
      weights = routing.straight_through(logits, jax.random.key(0))
      hidden = model.apply({'params': params}, inputs, train=False, route=weights)
      nll = model.apply({'params': params}, hidden, targets, method='loss')
      return nll.sum() / (targets > 0).sum(), weights

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, router_params)

  router_params = random_params(jax.eval_shape(
      functools.partial(router_lib.init, spec), jax.random.key(0)), seed=1)
  (loss, weights), (grads, router_grads) = loss_and_grads(
      spec, model_params(spec), router_params, inputs, targets)
  assert np.isfinite(loss) and set(np.unique(weights)) == {0.0, 1.0}
  assert all(np.isfinite(g).all() for g in jax.tree.leaves((grads, router_grads)))
  for path, grad in jax.tree_util.tree_leaves_with_path(router_grads):
    assert np.abs(grad).max() > 0, path  # Every router parameter learns.
  assert np.abs(grads['backbone']['input_proj']['kernel']).max() > 0


# ---------------------------------------------------------------- weight slicing


@jit
def all_paths(spec: ModelSpec, params: dict, inputs: jax.Array, routes: jax.Array) -> dict:
  """Hidden states and logits of the full model (no route), of every row's
  route on the masked path, and of every route sliced."""
  model = Recommender(spec)

  def run(route):
    hidden = model.apply({'params': params}, inputs, train=False, route=route)
    return hidden, model.apply({'params': params}, hidden, method='logits')

  space = RoutingSpace.of(spec)
  return dict(full=run(None), masked=run(jax.nn.one_hot(routes, space.num_routes)),
              sliced=[run(route) for route in space.routes])


# CpRec: block embedding, adaptive softmax and parameter sharing.
CPREC = dict(embedding='block', head='adaptive', cutoffs=(6, 15))


@pytest.mark.parametrize('backbone, overrides', [
    ('nextitnet', {}),
    ('sasrec', {}),
    ('nextitnet', dict(CPREC, sharing='cross-block')),
    ('sasrec', dict(CPREC, sharing='adjacent-layer')),
    ('sasrec', dict(tied=True, head='sampled')),  # Logits from the embedding table.
], ids=['nextitnet', 'sasrec', 'nextitnet-cprec', 'sasrec-cprec', 'sasrec-tied'])
def test_masked_route_equals_sliced_route_for_every_route(backbone, overrides):
  spec = make_spec(backbone, **overrides)
  params = model_params(spec)
  inputs, _ = windows(2 * R, seed=4)
  routes = np.arange(2 * R) % R  # Every route, twice.
  out = all_paths(spec, params, inputs, routes)

  masked_hidden, masked_logits = (np.asarray(x) for x in out['masked'])
  for k, route in enumerate(RoutingSpace.of(spec).routes):
    rows = routes == k
    hidden, logits = (np.asarray(x)[rows] for x in out['sliced'][k])
    assert hidden.shape[-1] == route.hidden_dim
    # Float32 rounding only: the paths sum over different widths (observed <= 5e-7).
    np.testing.assert_allclose(masked_hidden[rows, :, :route.hidden_dim], hidden,
                               rtol=1e-5, atol=1e-6, err_msg=str(route))
    assert np.all(masked_hidden[rows, :, route.hidden_dim:] == 0)
    np.testing.assert_allclose(masked_logits[rows], logits, rtol=1e-5, atol=5e-6,
                               err_msg=str(route))
  # The largest route is the full model: the same program sliced, up to
  # rounding masked.
  full_hidden, full_logits = (np.asarray(x) for x in out['full'])
  np.testing.assert_array_equal(out['sliced'][-1][0], full_hidden)
  np.testing.assert_array_equal(out['sliced'][-1][1], full_logits)
  rows = routes == R - 1
  np.testing.assert_allclose(masked_hidden[rows], full_hidden[rows], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masked_logits[rows], full_logits[rows], rtol=1e-5, atol=5e-6)


def test_a_sub_model_differs_from_the_full_model():
  # Guards the test above against routes that silently run the full model.
  spec = make_spec('sasrec')
  out = all_paths(spec, model_params(spec), windows(2 * R, seed=4)[0], np.arange(2 * R) % R)
  full = np.asarray(out['full'][1])
  for k in range(R - 1):
    assert np.abs(np.asarray(out['sliced'][k][1]) - full).max() > 1e-3, k


# ---------------------------------------------------------------- MACs


def _xla_macs(fn, *args) -> float:
  compiled = jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0}).lower(
      *args).compile()
  return profiling.compiled_flops(compiled) / 2


def _padding_macs(spec: ModelSpec, route: Route) -> int:
  """NextItNet's conv taps on the causal left padding, which XLA folds away
  (as in test_profiling)."""
  if spec.backbone != 'nextitnet':
    return 0
  taps = sum(min(j * d, spec.max_len) for r in spec.dilations[:route.depth]
             for d in (r, 2 * r) for j in range(1, spec.kernel_size))
  return taps * route.hidden_dim ** 2


@pytest.mark.parametrize('backbone, dims, routes', [
    ('nextitnet', (32, 64), [Route(32, 32, 1), Route(64, 32, 2), Route(32, 64, 2)]),
    ('sasrec', (128, 256), [Route(128, 128, 1), Route(256, 128, 2), Route(128, 256, 2)]),
])
def test_route_macs_match_xla(backbone, dims, routes):
  spec = ModelSpec(num_items=101, backbone=backbone, embed_dim=dims[1], hidden_dim=dims[1],
                   max_len=16, dilations=(1, 2), num_layers=2, ffn_dim=4 * dims[1],
                   route_embed_dims=dims, route_hidden_dims=dims, route_depths=(1, 2))
  model = Recommender(spec)
  params = jax.eval_shape(functools.partial(init, spec), jax.random.key(0))
  inputs = jnp.ones((1, spec.max_len), jnp.int32)
  for route in routes:
    macs = routing.route_macs(spec, route)
    xla = _xla_macs(lambda p, x: model.apply({'params': p}, x, train=False, route=route),
                    params, inputs)
    expected = macs['middle'] - _padding_macs(spec, route)
    assert expected * 0.99 <= xla <= expected * (1 + XLA_TOLERANCE), (route, xla / expected)
    hidden = jnp.ones((route.hidden_dim,), jnp.float32)
    xla = _xla_macs(lambda p, h: model.apply({'params': p}, h, method='logits'), params,
                    hidden)
    assert macs['output'] * 0.99 <= xla <= macs['output'] * (1 + XLA_TOLERANCE), route


@pytest.mark.parametrize('backbone', ['nextitnet', 'sasrec'])
def test_route_macs_of_the_full_route_are_profiling_macs(backbone):
  # With E != H the plain model has the input projection too: the same network.
  spec = make_spec(backbone, embed_dim=8, route_embed_dims=(4, 8), embedding='block',
                   head='adaptive', cutoffs=(6, 15))
  full = routing.route_macs(spec, RoutingSpace.of(spec).routes[-1])
  assert full == profiling.macs(spec)
  costs = routing.relative_costs(spec)
  assert costs[-1] == 1 and costs.min() == costs[0] > 0 and np.all(costs <= 1)


def default_space(backbone: str) -> ModelSpec:
  """The public code's space: E, H in {64, 96, 128}, D in {2, 4, 6, 8}; L = 50."""
  return ModelSpec(num_items=1000, backbone=backbone, embed_dim=128, hidden_dim=128,
                   max_len=50, dilations=(1, 2, 4, 8) * 2, num_layers=8, num_heads=4,
                   ffn_dim=512, route_embed_dims=(64, 96, 128),
                   route_hidden_dims=(64, 96, 128), route_depths=(2, 4, 6, 8))


@pytest.mark.parametrize('backbone', ['nextitnet', 'sasrec'])
def test_router_costs_under_two_percent_of_the_full_model(backbone):
  spec = default_space(backbone)
  space = RoutingSpace.of(spec)
  assert space.num_routes == 36
  full = routing.route_macs(spec, space.routes[-1])
  backbone_macs = full['embedding'] + full['middle']  # Without the output layer.
  analytic = router_lib.router_macs(spec)
  params = jax.eval_shape(functools.partial(router_lib.init, spec), jax.random.key(0))
  xla = _xla_macs(lambda p, x: router_lib.Router(spec).apply({'params': p}, x), params,
                  jnp.ones((1, spec.max_len), jnp.int32))
  # XLA also counts the router's elementwise work (LayerNorm at every position).
  assert analytic <= xla <= 1.3 * analytic
  ratio = xla / backbone_macs
  print(f'{backbone}: router / full model MACs = {analytic / backbone_macs:.4f} '
        f'(analytic), {ratio:.4f} (XLA)')
  assert ratio < 0.02


# ---------------------------------------------------------------- losses


def test_guide_targets_match_the_hand_computed_table():
  # w_i ~ (2^i / 2^n)^m; row 0 (hit) reversed.
  np.testing.assert_allclose(routing.guide_targets(3, 2.0),
                             np.array([[16, 4, 1], [1, 4, 16]]) / 21)
  np.testing.assert_allclose(routing.guide_targets(4, 1.0),
                             np.array([[8, 4, 2, 1], [1, 2, 4, 8]]) / 15)
  np.testing.assert_allclose(routing.guide_targets(2, 2.0), np.array([[4, 1], [1, 4]]) / 5)


def test_guide_uniform_and_cost_losses_match_numpy():
  spec = make_spec('nextitnet', route_embed_dims=(4, 8, 16))  # 3 x 2 x 2 routes.
  space = RoutingSpace.of(spec)
  logits = np.random.default_rng(0).normal(size=(4, space.num_routes)).astype(np.float32)
  hit = np.array([True, False, True, False])
  p = softmax(logits.astype(np.float64))
  expected = 0.0
  for dim, (options, power) in enumerate(zip(space.dims, (2, 2, 1))):
    marginal = np.zeros((4, len(options)))
    for r, route in enumerate(space.routes):
      marginal[:, options.index(route[dim])] += p[:, r]
    weights = (2.0 ** np.arange(len(options))) ** power
    targets = np.where(hit[:, None], weights[::-1], weights) / weights.sum()
    expected += -(targets * np.log(marginal)).sum(-1).mean()
  np.testing.assert_allclose(routing.guide_loss(space, logits, hit), expected, rtol=1e-5)
  np.testing.assert_allclose(routing.uniform_loss(logits),
                             -np.log(p).sum(-1).mean() / space.num_routes, rtol=1e-5)
  costs = routing.relative_costs(spec)
  np.testing.assert_allclose(routing.expected_cost(logits, costs), (p @ costs).mean(),
                             rtol=1e-5)


# ---------------------------------------------------------------- routed inference


def test_routed_inference_equals_masked_inference():
  spec = make_spec('sasrec', **CPREC)
  params = model_params(spec)
  # Routes 1, 6 and 7 with 5, 2 and 9 rows: buckets 8; 2; 8 + 2 (split).
  routes = np.random.default_rng(5).permutation(np.repeat([1, 6, 7], [5, 2, 9]))
  inputs, _ = windows(len(routes), seed=6)

  @jit
  def masked(spec, params, inputs, routes):
    model = Recommender(spec)
    hidden = model.apply({'params': params}, inputs, train=False,
                         route=jax.nn.one_hot(routes, R))[:, -1]
    return hidden, model.apply({'params': params}, hidden, method='logits')

  hidden, logits = masked(spec, params, inputs, routes)
  options = {'xla_backend_optimization_level': 0}
  infer = router_lib.RoutedInference(spec, buckets=(2, 4, 8), compiler_options=options)
  np.testing.assert_allclose(infer(params, inputs, routes), logits, rtol=1e-5, atol=5e-6)
  assert infer.num_compiled == 4  # (1, 8), (6, 2), (7, 8), (7, 2).
  shuffled = np.random.default_rng(7).permutation(len(routes))
  np.testing.assert_allclose(infer(params, inputs[shuffled], routes[shuffled]),
                             np.asarray(logits)[shuffled], rtol=1e-5, atol=5e-6)
  assert infer.num_compiled == 4  # Same groups: nothing new to compile.
  hidden_out = router_lib.RoutedInference(spec, output='hidden', buckets=(16,),
                                          compiler_options=options)
  np.testing.assert_allclose(hidden_out(params, inputs, routes), hidden, rtol=1e-5,
                             atol=1e-6)
