"""Tests for the block-wise adaptive embedding and softmax (models/blocks.py).

Every model call runs under jax.jit (static shapes; k and capacity static).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqcompress_jax.models.blocks import (AdaptiveSoftmax, BlockEmbedding,
                                           adaptive_softmax_params,
                                           block_embedding_params, block_widths,
                                           check_cutoffs, cutoffs_from_mass,
                                           tail_shares)
from seqcompress_jax.models.heads import PAD_LOGIT

V, H = 23, 8
CUTOFFS = (5, 12, 23)  # Blocks [0, 5), [5, 12), [12, 23).
WIDTHS = (8, 4, 2)


# XLA compilation dominates the run time on CPU: few programs, and no backend
# optimisation (it halves compile times).
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@functools.partial(jit, static_argnums=(0, 1, 2))
def _apply(model, method: str, static: tuple, variables: dict, *args) -> jax.Array:
  return model.apply(variables, *args, method=method, **dict(static))


def apply(model, method: str, variables: dict, *args, **static):
  """model.apply(variables, *args, method=method, **static), jitted; `static`
  holds the Python arguments (k, capacity)."""
  return _apply(model, method, tuple(sorted(static.items())), variables, *args)


@functools.partial(jit, static_argnums=0)
def init(model, rng: jax.Array) -> dict:
  if isinstance(model, BlockEmbedding):
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))
  return model.init(rng, jnp.zeros((1, H)), method='log_probs')


def num_params(params: dict) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def softmax_and_params(cutoffs=CUTOFFS, widths=WIDTHS, seed=0):
  model = AdaptiveSoftmax(V, H, cutoffs, widths)
  return model, init(model, jax.random.key(seed))


def hidden_states(seed: int, rows: int = 6, scale: float = 3.0) -> jax.Array:
  return scale * jax.random.normal(jax.random.key(100 + seed), (rows, H))


def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference_log_probs(variables: dict, hidden: jax.Array,
                        cutoffs=CUTOFFS) -> np.ndarray:
  """log p [B, V] by the formulas of the spec, in float64 numpy."""
  params = jax.tree.map(lambda x: np.asarray(x, np.float64), variables['params'])
  h = np.asarray(hidden, np.float64)
  head_logits = h @ params['head']
  head_logits[:, 0] = -np.inf  # PAD.
  head = log_softmax(head_logits)
  out = np.empty((len(h), V))
  out[:, :cutoffs[0]] = head[:, :cutoffs[0]]
  for j in range(2, len(cutoffs) + 1):
    lower, upper = cutoffs[j - 2], cutoffs[j - 1]
    tail = log_softmax(h @ params[f'tail_{j}_proj'] @ params[f'tail_{j}_out'])
    out[:, lower:upper] = head[:, cutoffs[0] + j - 2, None] + tail
  return out


# Cutoffs and widths.

def test_block_widths():
  assert block_widths(512, 3) == (512, 128, 32)
  assert block_widths(8, 4) == (8, 2, 1, 1)
  assert block_widths(8, 3, factor=2) == (8, 4, 2)
  assert block_widths(8, 3, widths=[8, 5, 5]) == (8, 5, 5)
  for widths in ([8, 4], [4, 4, 2], [8, 0, 2], [8, 4.0, 2]):
    with pytest.raises(ValueError, match='widths'):
      block_widths(8, 3, widths=widths)


def test_check_cutoffs():
  assert check_cutoffs((5, 12, 23), V) == CUTOFFS
  assert check_cutoffs([5, np.int64(12)], V) == CUTOFFS  # The final V may be left out.
  assert check_cutoffs((), V) == (V,)
  for bad in ((1, 12), (5, 5, 23), (12, 5), (5, 30), (5.0, 12), (True, 12)):
    with pytest.raises(ValueError, match='model.cutoffs'):
      check_cutoffs(bad, V)


def test_cutoffs_from_mass():
  counts = np.array([0, 40, 20, 15, 10, 5, 5, 3, 2])  # 100 interactions, V = 9.
  # Cumulative shares of items 1..8: .40 .60 .75 .85 .90 .95 .98 1.
  assert cutoffs_from_mass(counts, (0.5, 0.8)) == (3, 5, 9)
  assert cutoffs_from_mass(counts, [0.6, 0.75, 0.9]) == (3, 4, 6, 9)  # Shares met exactly.
  assert cutoffs_from_mass(counts, (0.3,)) == (2, 9)
  for mass in ((0.5, 0.55), (0.99,), (0.8, 0.5), (0.0,), (1.0,)):
    with pytest.raises(ValueError, match='mass'):
      cutoffs_from_mass(counts, mass)
  with pytest.raises(ValueError, match='non-increasing'):
    cutoffs_from_mass(counts[[0, 2, 1, 3, 4, 5, 6, 7, 8]], (0.5,))


def test_worked_example_sizes():
  v, d, cutoffs = 50_000, 512, (7000, 15000, 50_000)
  widths = block_widths(d, len(cutoffs))
  embed = block_embedding_params(v, d, cutoffs, widths)
  softmax = adaptive_softmax_params(v, d, cutoffs, widths)
  assert embed == 7000 * 512 + 8000 * 128 + 128 * 512 + 35000 * 32 + 32 * 512 == 5_809_920
  assert softmax == 512 * 7002 + 512 * 128 + 128 * 8000 + 512 * 32 + 32 * 35000 == 5_810_944
  assert round(embed / 1e6, 2) == round(softmax / 1e6, 2) == 5.81


# BlockEmbedding.

def test_block_embedding_matches_reference():
  model = BlockEmbedding(V, H, CUTOFFS, WIDTHS)
  variables = init(model, jax.random.key(0))
  params = jax.tree.map(np.asarray, variables['params'])
  assert set(params) == {'head', 'tail_2_table', 'tail_2_proj', 'tail_3_table',
                         'tail_3_proj'}
  assert num_params(params) == block_embedding_params(V, H, CUTOFFS, WIDTHS)
  expected = np.stack(
      [params['head'][v] if v < 5
       else params['tail_2_table'][v - 5] @ params['tail_2_proj'] if v < 12
       else params['tail_3_table'][v - 12] @ params['tail_3_proj'] for v in range(V)])
  ids = jnp.arange(V, dtype=jnp.int32)
  np.testing.assert_allclose(apply(model, '__call__', variables, ids.reshape(1, V))[0],
                             expected, rtol=1e-5, atol=1e-7)


def test_block_embedding_with_one_block_is_a_table():
  model = BlockEmbedding(V, H, (), (H,))
  variables = init(model, jax.random.key(0))
  assert jax.tree.map(jnp.shape, variables['params']) == {'head': (V, H)}
  ids = jnp.array([[0, 3, 22], [7, 7, 1]])
  np.testing.assert_array_equal(apply(model, '__call__', variables, ids),
                                variables['params']['head'][ids])


# AdaptiveSoftmax.

def test_log_probs_are_a_distribution_over_items():
  model, variables = softmax_and_params()
  assert num_params(variables) == adaptive_softmax_params(V, H, CUTOFFS, WIDTHS)
  hidden = hidden_states(0)
  log_probs = apply(model, 'log_probs', variables, hidden)
  assert log_probs.shape == (6, V) and log_probs.dtype == jnp.float32
  np.testing.assert_array_equal(log_probs[:, 0], np.float32(PAD_LOGIT))
  np.testing.assert_allclose(jnp.exp(log_probs[:, 1:]).sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(log_probs[:, 1:],
                             reference_log_probs(variables, hidden)[:, 1:], atol=1e-4)
  np.testing.assert_array_equal(apply(model, '__call__', variables, hidden), log_probs)


def test_one_block_is_the_full_softmax():
  model, variables = softmax_and_params(cutoffs=(), widths=(H,))
  assert jax.tree.map(jnp.shape, variables['params']) == {'head': (H, V)}
  hidden = hidden_states(1)
  logits = (hidden @ variables['params']['head']).at[:, 0].set(-jnp.inf)
  log_probs = apply(model, 'log_probs', variables, hidden)
  np.testing.assert_allclose(log_probs[:, 1:], jax.nn.log_softmax(logits)[:, 1:],
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(apply(model, 'score', variables, hidden, jnp.arange(V)),
                             log_probs, rtol=1e-6, atol=1e-6)


def test_nll_is_the_negative_log_prob_of_the_target():
  model, variables = softmax_and_params()
  hidden = hidden_states(2, rows=2 * V)
  targets = jnp.tile(jnp.arange(V), 2)  # Every id, PAD included.
  nll = apply(model, 'nll', variables, hidden.reshape(2, V, H), targets.reshape(2, V))
  expected = -reference_log_probs(variables, hidden)[np.arange(2 * V), targets]
  expected[targets == 0] = 0.0
  np.testing.assert_allclose(nll.reshape(-1), expected, rtol=1e-5, atol=1e-5)


def test_nll_gradient_reaches_every_parameter():
  model, variables = softmax_and_params()
  targets = jnp.array([0, 1, 4, 5, 11, 12, 22])  # PAD, head, both tails.
  hidden = hidden_states(3, rows=len(targets))
  loss = lambda v: model.apply(v, hidden, targets, method='nll').sum()
  for name, grad in jit(jax.grad(loss))(variables)['params'].items():
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0, name


@pytest.mark.parametrize('capacity', [
    (0.5, 0.5),  # Room for every tail target: the gathered branch.
    (0.0, 0.1),  # 8 and 13 rows for 14 and 22 tail targets: the fallbacks.
])
def test_capacity_bounded_nll_is_exact(capacity):
  model, variables = softmax_and_params()
  bounded = AdaptiveSoftmax(V, H, CUTOFFS, WIDTHS, capacity=capacity)
  targets = jnp.concatenate([jnp.arange(V), jnp.arange(V)[::-1]]).reshape(2, V)
  hidden = hidden_states(4, rows=2 * V).reshape(2, V, H)

  def loss_and_grad(model):
    loss = lambda v, h: model.apply(v, h, targets, method='nll')
    return loss(variables, hidden), jax.grad(lambda v, h: loss(v, h).sum(), (0, 1))(
        variables, hidden)

  (expected, expected_grads), (got, got_grads) = jit(
      lambda: (loss_and_grad(model), loss_and_grad(bounded)))()
  expected_nll = -reference_log_probs(variables, hidden.reshape(-1, H))[
      np.arange(2 * V), targets.reshape(-1)]
  expected_nll[targets.reshape(-1) == 0] = 0.0
  np.testing.assert_allclose(got.reshape(-1), expected_nll, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               got_grads, expected_grads)


def test_tail_shares():
  counts = np.array([0, 9, 5, 3, 2, 1, 0])  # PAD, then ids 1..6; 20 interactions.
  np.testing.assert_allclose(tail_shares(counts, (3, 5)), (5 / 20, 1 / 20))
  np.testing.assert_allclose(tail_shares(counts, (2,)), (11 / 20,))
  assert tail_shares(counts, ()) == ()


def test_score_is_log_probs_gathered():
  model, variables = softmax_and_params()
  hidden = hidden_states(4)
  log_probs = apply(model, 'log_probs', variables, hidden)
  prepared = apply(model, 'prepare', variables, hidden)
  assert prepared['tail_norm'].shape == (6, 2)
  chunked = model.clone(norm_chunk=4)  # 2 and 3 steps over tails of 7 and 11 items.
  np.testing.assert_allclose(apply(chunked, 'prepare', variables, hidden)['tail_norm'],
                             prepared['tail_norm'], rtol=1e-6)
  for start in range(0, V, 8):  # Chunks of 8 ids (shorter rows padded with PAD).
    chunk = jnp.arange(start, start + 8) % V
    for h in (hidden, prepared):
      np.testing.assert_allclose(apply(model, 'score', variables, h, chunk),
                                 log_probs[:, chunk], rtol=1e-6, atol=1e-5)
  items = jax.random.randint(jax.random.key(5), (6, 9), 0, V).at[:, 0].set(0)
  np.testing.assert_allclose(apply(model, 'score', variables, prepared, items),
                             jnp.take_along_axis(log_probs, items, axis=1),
                             rtol=1e-6, atol=1e-5)
  with pytest.raises(ValueError, match='never tied'):
    apply(model, 'score', variables, hidden, items, jnp.zeros((V, H)))


# Top k.

@functools.partial(jit, static_argnums=(0, 3, 4))
def topk_and_exact(model, variables, hidden, k, capacity):
  """topk(hidden, k, capacity) and lax.top_k(log_probs(hidden), k)."""
  return (model.apply(variables, hidden, k, capacity, method='topk'),
          jax.lax.top_k(model.apply(variables, hidden, method='log_probs'), k))


def assert_exact_topk(model, variables, hidden, k, capacity=None):
  (scores, items), (expected_scores, expected_items) = topk_and_exact(
      model, variables, hidden, k, capacity)
  assert scores.dtype == jnp.float32 and items.dtype == jnp.int32
  np.testing.assert_array_equal(items, expected_items)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize('k, capacity', [(1, 2), (3, None), (7, 2), (V - 1, 12)])
def test_topk_is_exact(k, capacity):
  # 12 rows: capacity None (8) and 2 gather rows, 12 computes every row.
  # k >= c1 - 1 = 4 head items needs every tail for every row.
  for seed in range(3):
    model, variables = softmax_and_params(seed=seed)
    assert_exact_topk(model, variables, hidden_states(seed, rows=12), k, capacity)
  # Tails of 7 and 11 items in chunks of 3 (the last one padded) and 1.
  for chunk in (3, 1):
    chunked = AdaptiveSoftmax(V, H, CUTOFFS, WIDTHS, norm_chunk=chunk)
    assert_exact_topk(chunked, variables, hidden_states(5, rows=12), k, capacity)


def test_topk_capacity_overflow_and_no_tail_needed():
  # Feature 0 of the hidden state (+-1) pushes both cluster tokens far up or
  # down, so exactly the rows with +1 need the tails for k = 3 (k = 6 exceeds
  # the 4 head items: every row needs them, however unlikely the clusters).
  model, variables = softmax_and_params()
  head = variables['params']['head'].at[0].set(0.0).at[0, 5:].set(50.0)
  variables = {'params': {**variables['params'], 'head': head}}
  hidden = hidden_states(6, rows=16)
  for num_needing in (0, 3, 4, 5, 16):  # Capacity 4: gathered, then whole batch.
    sign = jnp.where(jnp.arange(16) < num_needing, 1.0, -1.0)
    for k in (3, 6):
      assert_exact_topk(model, variables, hidden.at[:, 0].set(sign), k, capacity=4)


def test_topk_when_cluster_tokens_crowd_the_head():
  # Cluster 2 is by far the likeliest head entry, but its 7 items share its
  # mass evenly: head item 1 is the top 1 although cluster 2 is the head's
  # top 1, which CpRec's rule alone (evaluate the tails in it) would miss.
  model, variables = softmax_and_params()
  params = jax.tree.map(jnp.zeros_like, variables['params'])
  params['head'] = params['head'].at[0, 1].set(2.0).at[0, 5].set(3.0)
  hidden = jnp.zeros((1, H)).at[0, 0].set(1.0)
  (_, items), _ = topk_and_exact(model, {'params': params}, hidden, 1, None)
  assert items.tolist() == [[1]]
  assert_exact_topk(model, {'params': params}, hidden, 1)


@pytest.mark.parametrize('dtype, shards', [('float32', 1), ('float32', 3), ('bfloat16', 1)])
def test_tail_bound_is_an_upper_bound_on_the_best_tail_item(dtype, shards):
  # The bound topk skips tails with: at least the best log p(item | cluster)
  # of each tail (as log_probs computes it), and at most 0; over seeds and
  # hidden scales (large scales spread the logits far apart).
  model = AdaptiveSoftmax(V, H, CUTOFFS, WIDTHS, dtype=dtype, item_shards=shards)
  for seed in range(3):
    variables = init(model, jax.random.key(seed))
    for scale in (0.3, 3.0, 30.0):
      hidden = hidden_states(seed, rows=12, scale=scale)
      log_p = np.asarray(apply(model, 'log_probs', variables, hidden), np.float64)
      for tail, (lower, upper) in enumerate(zip(CUTOFFS, CUTOFFS[1:]), start=1):
        bound = np.asarray(model.apply(variables, hidden, tail,
                                       method=lambda m, h, t: m._tail_bound(h, t)))
        best = log_p[:, lower:upper].max(axis=1) - np.logaddexp.reduce(
            log_p[:, lower:upper], axis=1)  # log p(best item | cluster).
        assert np.all(bound >= best - 1e-6) and np.all(bound <= 0.0), (tail, scale)


def test_tail_bound_is_tight_for_a_uniform_tail():
  # All items of a tail alike: each has p(item | cluster) = 1 / size, and the
  # bound (radius 0, Jensen exact) is log(1 / size) up to its rounding slack.
  model, variables = softmax_and_params()
  params = dict(variables['params'])
  params['tail_3_out'] = jnp.tile(params['tail_3_out'][:, :1], (1, CUTOFFS[2] - CUTOFFS[1]))
  hidden = hidden_states(1, scale=0.3)
  bound = model.apply({'params': params}, hidden, 2, method=lambda m, h, t: m._tail_bound(h, t))
  np.testing.assert_allclose(bound, -np.log(CUTOFFS[2] - CUTOFFS[1]), atol=0.01)


def test_topk_rejects_bad_k():
  model, variables = softmax_and_params()
  for k in (0, V):
    with pytest.raises(ValueError, match=r'k: expected an integer in \[1, 22\]'):
      apply(model, 'topk', variables, hidden_states(0), k=k)
