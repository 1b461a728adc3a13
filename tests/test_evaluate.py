"""Ranks, metrics and negative sampling against brute force and hand-made cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqcompress_jax import evaluate as ev
from seqcompress_jax.data import pipeline
from seqcompress_jax.metrics import metrics_from_ranks

V, H, L, HISTORY = 23, 3, 5, 6  # Vocabulary (PAD included), width, input and history lengths.


def encode(params, inputs):
  """A stand-in model: the sum of the embeddings of the non-PAD inputs."""
  return (params['emb'][inputs] * (inputs != 0)[..., None]).sum(axis=1)


def score(params, h, items):
  w = params['out'].T[items]  # [C, H] or [b, C, H]
  return h @ w.T if items.ndim == 1 else jnp.einsum('bh,bch->bc', h, w)


def make_params(emb, out):
  return {'emb': jnp.asarray(emb, jnp.float32), 'out': jnp.asarray(out, jnp.float32)}


def random_params(seed=0):
  """Small integer weights: every score is exact in float32, and ties are common."""
  rng = np.random.default_rng(seed)
  return make_params(rng.integers(-2, 3, (V, H)), rng.integers(-2, 3, (H, V)))


def random_examples(n=37, seed=1):
  """Left-padded inputs; histories with PAD, duplicates and, in some rows, the target."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(1, V, (n, L)).astype(np.int32)
  inputs[np.arange(L)[None, :] < rng.integers(0, L, (n, 1))] = 0
  targets = rng.integers(1, V, n).astype(np.int32)
  history = rng.integers(0, V, (n, HISTORY)).astype(np.int32)
  history[::3, 0] = targets[::3]
  history[::4, 2] = history[::4, 1]
  history[1::5, :2] = 0
  return pipeline.EvalSet(inputs=inputs, targets=targets, users=np.arange(n), history=history)


def brute_force_scores(params, examples):
  emb, out = np.asarray(params['emb'], np.float64), np.asarray(params['out'], np.float64)
  h = (emb[examples.inputs] * (examples.inputs != 0)[..., None]).sum(axis=1)
  return h @ out  # [N, V]


def brute_force_ranks(params, examples, exclude_history):
  scores = brute_force_scores(params, examples)
  above = scores > scores[np.arange(len(examples)), examples.targets][:, None]
  above[:, 0] = False
  if exclude_history:
    for row, (items, target) in enumerate(zip(examples.history, examples.targets)):
      for item in set(items.tolist()) - {0, int(target)}:
        above[row, item] = False
  return above.sum(axis=1)


@pytest.mark.parametrize('exclude_history', [False, True])
@pytest.mark.parametrize('chunk_size', [1, 7, V - 1, V, 4096])
@pytest.mark.parametrize('batch_size', [1, 3, 16])
def test_ranks_equal_brute_force_for_any_chunk_and_batch_size(
    exclude_history, chunk_size, batch_size):
  params, examples = random_params(), random_examples()
  rank_fn = ev.make_rank_fn(encode, score, V, chunk_size, exclude_history)
  ranks = ev.ranks_of(rank_fn, params, pipeline.eval_batches(examples, batch_size))
  expected = brute_force_ranks(params, examples, exclude_history)
  np.testing.assert_array_equal(ranks, expected)
  if exclude_history:  # The fixture really exercises the exclusion.
    assert (expected < brute_force_ranks(params, examples, False)).any()


@pytest.mark.parametrize('chunk_size', [1, 2, 5, 6, 4096])
def test_ties_pad_and_history_by_hand(chunk_size):
  # Every input embeds to 1, so the item scores are the row of `out`: PAD scores
  # highest and must not count; items 2 and 5 tie, and so do items 1 and 3.
  params = make_params(np.ones((6, 1)), [[9, 2, 5, 2, 1, 5]])
  batch = {
      'inputs': np.array([[0, 1]] * 4, np.int32),
      'targets': np.array([1, 3, 2, 4], np.int32),
      'history': np.array([[2, 2, 0, 1],   # 2 (above, twice) goes; the target stays out
                           [0, 0, 0, 0],   # nothing to exclude
                           [5, 1, 5, 0],   # 5 ties and 1 is below: nothing changes
                           [4, 3, 3, 0]],  # the target itself is no competitor anyway
                          np.int32),
      'weights': np.ones(4, np.float32)}
  plain = ev.make_rank_fn(encode, score, 6, chunk_size)
  masked = ev.make_rank_fn(encode, score, 6, chunk_size, exclude_history=True)
  assert plain(params, batch).tolist() == [2, 2, 0, 4]
  assert masked(params, batch).tolist() == [1, 2, 0, 3]


def test_target_never_competes_with_itself_when_scores_round_by_call_shape():
  # Each call adds 1e-3 per scored column, as if rounding depended on the shape:
  # the target would then beat its own [b, 1] score in the chunks and the history.
  def shaky_score(params, h, items):
    return score(params, h, items) + 1e-3 * items.shape[-1]

  params = make_params(np.ones((6, 1)), [[9, 10, 20, 30, 40, 50]])
  batch = {'inputs': np.ones((1, 2), np.int32), 'targets': np.array([3], np.int32),
           'history': np.array([[3, 4, 0, 0]], np.int32)}
  for chunk_size in (1, 2, 5):
    plain = ev.make_rank_fn(encode, shaky_score, 6, chunk_size)
    masked = ev.make_rank_fn(encode, shaky_score, 6, chunk_size, exclude_history=True)
    assert plain(params, batch).tolist() == [2]
    assert masked(params, batch).tolist() == [1]


def test_all_equal_scores_rank_every_target_first():
  params = make_params(np.ones((V, 1)), np.ones((1, V)))
  batch = {'inputs': np.ones((3, L), np.int32), 'targets': np.array([1, 7, V - 1], np.int32)}
  assert ev.make_rank_fn(encode, score, V, 4)(params, batch).tolist() == [0, 0, 0]


def test_exclude_history_needs_a_history():
  rank_fn = ev.make_rank_fn(encode, score, V, exclude_history=True)
  batch = {'inputs': np.ones((2, L), np.int32), 'targets': np.ones(2, np.int32)}
  with pytest.raises(ValueError, match='history'):
    rank_fn(random_params(), batch)


@pytest.mark.parametrize('num_items, chunk_size', [(1, 4), (V, 0)])
def test_make_rank_fn_rejects_bad_sizes(num_items, chunk_size):
  with pytest.raises(ValueError, match='must be >= '):
    ev.make_rank_fn(encode, score, num_items, chunk_size)


def test_metrics_by_hand():
  ranks = np.array([0, 1, 4, 9, 20, 0, 3])
  weights = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)  # the last two are padding
  metrics = metrics_from_ranks(ranks, weights, ks=(5, 10))
  expected = {
      'HR@5': 3 / 5,  # ranks 0, 1, 4
      'NDCG@5': (1 + 1 / np.log2(3) + 1 / np.log2(6)) / 5,  # 0.403557
      'MRR@5': (1 + 1 / 2 + 1 / 5) / 5,  # 0.34
      'HR@10': 4 / 5,  # and rank 9
      'NDCG@10': (1 + 1 / np.log2(3) + 1 / np.log2(6) + 1 / np.log2(11)) / 5,  # 0.461369
      'MRR@10': (1 + 1 / 2 + 1 / 5 + 1 / 10) / 5,  # 0.36
      'MRR': (1 + 1 / 2 + 1 / 5 + 1 / 10 + 1 / 21) / 5,  # 0.369524
  }
  assert list(metrics) == list(expected)
  assert metrics == pytest.approx(expected, rel=1e-12)
  assert metrics['NDCG@5'] == pytest.approx(0.4035565121611998, rel=1e-12)
  assert metrics['NDCG@10'] == pytest.approx(0.4613694774247774, rel=1e-12)
  assert metrics['MRR'] == pytest.approx(0.3695238095238095, rel=1e-12)


def test_metrics_weighted_and_unweighted():
  assert metrics_from_ranks(np.array([0, 20]), np.array([3.0, 1.0]), [5])['HR@5'] == 0.75
  assert metrics_from_ranks(np.array([0, 20]), None, [5])['HR@5'] == 0.5
  with pytest.raises(ValueError, match='weight > 0'):
    metrics_from_ranks(np.array([0]), np.array([0.0]), [5])


def test_evaluate_reports_brute_force_metrics_over_padded_batches():
  params, examples = random_params(), random_examples()
  rank_fn = ev.make_rank_fn(encode, score, V, chunk_size=8, exclude_history=True)
  metrics = ev.evaluate(rank_fn, params, pipeline.eval_batches(examples, 16), ks=(1, 5))
  expected = metrics_from_ranks(brute_force_ranks(params, examples, True), None, (1, 5))
  assert metrics == {**expected, 'num_examples': len(examples)}


def check_negatives(negatives, targets, num_items, num_negatives):
  assert negatives.dtype == np.int32
  assert negatives.shape == (len(targets), num_negatives)
  assert negatives.min() >= 1 and negatives.max() < num_items
  assert not (negatives == targets[:, None]).any()
  assert (np.diff(np.sort(negatives, axis=1), axis=1) > 0).all()


@pytest.mark.parametrize('by', ['uniform', 'popularity'])
def test_negatives_are_distinct_valid_non_targets_and_seeded(by):
  num_items, num_negatives = 200, 30
  targets = np.random.default_rng(0).integers(1, num_items, 5000)
  count = np.arange(num_items)[::-1] ** 2  # very skewed: many duplicate draws
  sample = lambda seed: ev.sample_negatives(targets, num_items, num_negatives, by, count, seed)
  negatives = sample(0)
  check_negatives(negatives, targets, num_items, num_negatives)
  np.testing.assert_array_equal(negatives, sample(0))
  assert (negatives != sample(1)).any()


def test_negatives_can_take_every_other_item():
  targets = np.array([1, 5, 9, 9])
  negatives = ev.sample_negatives(targets, 10, num_negatives=8)
  check_negatives(negatives, targets, 10, 8)
  assert [sorted(row) for row in negatives.tolist()] == [
      sorted(set(range(1, 10)) - {t}) for t in targets.tolist()]


def test_negatives_follow_popularity():
  num_items = 50
  count = np.random.default_rng(0).integers(0, 100, num_items)
  count[[0, 7, 8]] = 0  # PAD and two items never seen in training
  targets = np.full(20000, 3)
  negatives = ev.sample_negatives(targets, num_items, 3, 'popularity', count)
  check_negatives(negatives, targets, num_items, 3)
  frequency = np.bincount(negatives.ravel(), minlength=num_items)
  assert frequency[[0, 3, 7, 8]].tolist() == [0, 0, 0, 0]
  others = np.setdiff1d(np.arange(num_items), [0, 3])
  assert np.corrcoef(frequency[others], count[others])[0, 1] > 0.95
  uniform = np.bincount(ev.sample_negatives(targets, num_items, 3).ravel(), minlength=num_items)
  assert np.corrcoef(uniform[others], count[others])[0, 1] < 0.3


def test_negatives_for_many_examples_and_items():
  targets = np.random.default_rng(0).integers(1, 10**6, 100_000)
  negatives = ev.sample_negatives(targets, 10**6, 100, seed=3)
  check_negatives(negatives, targets, 10**6, 100)


@pytest.mark.parametrize('kwargs, message', [
    ({'num_negatives': 9}, r'num_negatives must be in \[1, num_items - 2 = 8\]'),
    ({'num_negatives': 0}, 'num_negatives must be in'),
    ({'targets': np.array([0, 1])}, r'targets must be in \[1, 9\]'),
    ({'targets': np.array([1, 10])}, r'targets must be in \[1, 9\]'),
    ({'targets': np.array([[1]])}, '1-D integer'),
    ({'by': 'zipf'}, "by must be 'uniform' or 'popularity'"),
    ({'by': 'popularity'}, 'needs item_count'),
    ({'by': 'popularity', 'item_count': np.ones(9)}, 'needs item_count'),
    ({'by': 'popularity', 'item_count': -np.ones(10, int)}, 'integers >= 0'),
    ({'by': 'popularity', 'item_count': np.ones(10)}, 'integers >= 0'),
    ({'by': 'popularity', 'item_count': np.array([0, 1, 1, 1, 0, 0, 0, 0, 0, 0])},
     'too few'),
])
def test_sample_negatives_rejects_bad_arguments(kwargs, message):
  arguments = {'targets': np.array([1, 2]), 'num_items': 10, 'num_negatives': 3, **kwargs}
  with pytest.raises(ValueError, match=message):
    ev.sample_negatives(**arguments)


def test_sampled_ranks_equal_brute_force():
  params, examples = random_params(), random_examples()
  negatives = ev.sample_negatives(examples.targets, V, 10, seed=5)
  batches = ev.with_negatives(pipeline.eval_batches(examples, 3), negatives)
  ranks = ev.ranks_of(ev.make_sampled_rank_fn(encode, score), params, batches)
  scores = brute_force_scores(params, examples)
  target_score = scores[np.arange(len(examples)), examples.targets]
  negative_score = np.take_along_axis(scores, negatives, axis=1)
  np.testing.assert_array_equal(ranks, (negative_score > target_score[:, None]).sum(axis=1))


@pytest.mark.parametrize('chunk_size', [1, 4, 7, 23, 100])
@pytest.mark.parametrize('k', [1, 3, 23])
def test_chunked_top_k_equals_a_sort(chunk_size, k):
  # 23 ids in chunks that do and do not divide it, k above and below the chunk.
  scores = np.random.default_rng(k).normal(size=(5, 23)).astype(np.float32)
  top, ids = jax.jit(lambda s: ev.chunked_top_k(lambda i: s[:, i], 23, k, chunk_size))(
      jnp.asarray(scores))
  expected = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  np.testing.assert_array_equal(ids, expected)  # Distinct scores: one order.
  np.testing.assert_array_equal(top, np.take_along_axis(scores, expected, axis=1))


def test_chunked_top_k_rejects_bad_k():
  with pytest.raises(ValueError, match=r'k: expected an integer in \[1, 23\]'):
    ev.chunked_top_k(lambda i: jnp.zeros((2, i.shape[0])), 23, 24)
