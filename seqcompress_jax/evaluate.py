"""Evaluation by ranks: full ranking over all items, or the sampled protocol.

A target's rank is the number of competitors scoring strictly above it (ties
count in its favour). A model is seen through two functions:
`encode(params, inputs) -> h [b, H]`, the state at the last position (inputs
is the batch's 'inputs': item ids [b, L], or any pytree of [b, ...] arrays
encode understands, e.g. a routed model's {'items', 'routes'}), and
`score(params, h, items) -> [b, C]`, where `items` is [C] (the same ids for
every row) or [b, C] (ids per row). Scores should be float32: in a coarse
dtype such as bfloat16 many items tie with the target and ranks look better.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from seqcompress_jax import sharding
from seqcompress_jax.data.dataset import PAD
from seqcompress_jax.metrics import metrics_from_ranks
from seqcompress_jax.models.heads import padded_size

Params = Any
Batch = Mapping[str, Any]
EncodeFn = Callable[[Params, jax.Array], jax.Array]
ScoreFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
RankFn = Callable[[Params, Batch], jax.Array]

_SAMPLE_BLOCK = 1 << 14  # Rows sampled at a time; each block has its own stream.


def _selecting(fn: Callable[[Params, dict], jax.Array],
               keys: Sequence[str]) -> RankFn:
  """Passes only `keys` of a batch to `fn`, so other entries are not transferred."""

  def select_and_call(params: Params, batch: Batch) -> jax.Array:
    missing = [key for key in keys if key not in batch]
    if missing:
      raise ValueError(f'the evaluation batch has no {missing} (it has {sorted(batch)})')
    return fn(params, {key: batch[key] for key in keys})

  return select_and_call


def _distinct_above(history: jax.Array, history_score: jax.Array,
                    targets: jax.Array, target_score: jax.Array) -> jax.Array:
  """int32 [b]: distinct items of each sorted history row, PAD and the target
  left out, that score above the target."""
  first = jnp.concatenate(
      [jnp.ones_like(history[:, :1], bool), history[:, 1:] != history[:, :-1]], axis=1)
  counted = (first & (history != PAD) & (history != targets[:, None])
             & (history_score > target_score))
  return counted.sum(axis=1, dtype=jnp.int32)


def make_rank_fn(encode: EncodeFn, score: ScoreFn, num_items: int,
                 chunk_size: int = 4096, exclude_history: bool = False,
                 mesh: Mesh | None = None) -> RankFn:
  """(params, batch) -> int32 [b]: items in 1..num_items-1 scoring above the target.

  Items are scored `chunk_size` ids at a time in a jitted loop, so memory is
  O(b * chunk_size) whatever the vocabulary. With `exclude_history`, the
  distinct items of the batch's 'history' (other than PAD and the target) are
  not competitors. Ranks do not depend on the chunk or batch size as long as
  `score` gives an item the same value however it is asked for.

  On a `mesh` (sharding.py), the batch's rows are split over `data` (as are
  the ranks) and each chunk's items over `model` (the chunk rounded up to a
  multiple of mesh.model), so a device scores b / data x chunk_size / model
  of them and no device holds a whole catalogue row.
  """
  if num_items < 2:
    raise ValueError(f'num_items must be >= 2 (PAD and an item), got {num_items}')
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  chunk_size = min(chunk_size, num_items - 1)
  if mesh is not None:
    chunk_size = padded_size(chunk_size, mesh.shape[sharding.MODEL])
  num_chunks = -(-(num_items - 1) // chunk_size)

  @jax.jit
  def ranks(params: Params, batch: dict) -> jax.Array:
    targets = batch['targets']
    h = encode(params, batch['inputs'])
    target_score = score(params, h, targets[:, None])  # [b, 1]

    def count_chunk(i: jax.Array, count: jax.Array) -> jax.Array:
      items = 1 + i * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32)
      valid = items < num_items
      scores = sharding.constrain(score(params, h, jnp.where(valid, items, PAD)),
                                  mesh, sharding.DATA, sharding.MODEL)
      # The target is left out by id, so rounding can never rank it above itself.
      above = (scores > target_score) & valid & (items != targets[:, None])
      return count + above.sum(axis=1, dtype=jnp.int32)

    count = jax.lax.fori_loop(0, num_chunks, count_chunk,
                              jnp.zeros(targets.shape, jnp.int32))
    if exclude_history:
      history = jnp.sort(batch['history'], axis=1)
      count -= _distinct_above(history, score(params, h, history), targets, target_score)
    return sharding.constrain(count, mesh, sharding.DATA)

  keys = ('inputs', 'targets') + (('history',) if exclude_history else ())
  return _selecting(ranks, keys)


def chunked_top_k(score_ids: Callable[[jax.Array], jax.Array], num_ids: int, k: int,
                  chunk_size: int = 4096) -> tuple[jax.Array, jax.Array]:
  """The top k (scores, int32 ids) [b, k] of score_ids(ids [C]) -> [b, C] over
  the ids 0..num_ids-1, `chunk_size` ids at a time in a loop that keeps the
  best k so far: memory O(b * (chunk_size + k)) instead of O(b * num_ids).
  The same values as lax.top_k over all the scores (ties may order differently).
  """
  if not 1 <= k <= num_ids:
    raise ValueError(f'k: expected an integer in [1, {num_ids}], got {k!r}')
  chunk_size = max(1, min(chunk_size, num_ids))
  num_chunks = -(-num_ids // chunk_size)

  def merge(i: jax.Array, best: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    ids = i * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32)
    scores = jnp.where(ids < num_ids, score_ids(jnp.minimum(ids, num_ids - 1)), -jnp.inf)
    scores = jnp.concatenate([best[0], scores.astype(jnp.float32)], axis=1)
    ids = jnp.concatenate([best[1], jnp.broadcast_to(ids, scores.shape[:1] + ids.shape)], axis=1)
    top, order = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(ids, order, axis=1)

  rows = jax.eval_shape(score_ids, jnp.zeros(chunk_size, jnp.int32)).shape[0]
  start = (jnp.full((rows, k), -jnp.inf), jnp.zeros((rows, k), jnp.int32))
  return jax.lax.fori_loop(0, num_chunks, merge, start)


def make_sampled_rank_fn(encode: EncodeFn, score: ScoreFn) -> RankFn:
  """(params, batch) -> int32 [b]: the batch's 'negatives' [b, n] scoring above the target."""

  @jax.jit
  def ranks(params: Params, batch: dict) -> jax.Array:
    candidates = jnp.concatenate([batch['targets'][:, None], batch['negatives']], axis=1)
    scores = score(params, encode(params, batch['inputs']), candidates)
    return (scores[:, 1:] > scores[:, :1]).sum(axis=1, dtype=jnp.int32)

  return _selecting(ranks, ('inputs', 'targets', 'negatives'))


def _check_sampling(targets: np.ndarray, num_items: int, num_negatives: int,
                    by: str, item_count: np.ndarray | None) -> None:
  if num_items < 3:
    raise ValueError(f'num_items must be >= 3 to sample negatives, got {num_items}')
  if not 1 <= num_negatives <= num_items - 2:
    raise ValueError(f'num_negatives must be in [1, num_items - 2 = {num_items - 2}], '
                     f'got {num_negatives}')
  if targets.ndim != 1 or targets.dtype.kind not in 'iu':
    raise ValueError(f'targets must be a 1-D integer array, got {targets.dtype} '
                     f'{targets.shape}')
  if targets.size and (targets.min() < 1 or targets.max() >= num_items):
    raise ValueError(f'targets must be in [1, {num_items - 1}], got '
                     f'[{targets.min()}, {targets.max()}]')
  if by not in ('uniform', 'popularity'):
    raise ValueError(f"by must be 'uniform' or 'popularity', got {by!r}")
  if by == 'uniform':
    return
  if item_count is None or item_count.shape != (num_items,):
    raise ValueError(f"by='popularity' needs item_count of shape ({num_items},), got "
                     f'{None if item_count is None else item_count.shape}')
  if item_count.dtype.kind not in 'iu' or (item_count < 0).any():
    raise ValueError(f'item_count must hold integers >= 0, got {item_count.dtype} '
                     f'with minimum {item_count.min()}')
  popular = item_count[1:] > 0
  if targets.size and popular.sum() - popular[targets - 1].max() < num_negatives:
    raise ValueError(f'only {popular.sum()} items have a positive count: too few '
                     f'to draw {num_negatives} negatives besides the target')


def _first_distinct(draws: np.ndarray, targets: np.ndarray,
                    num_negatives: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_negatives` distinct non-target draws of each row, and
  whether the row has that many."""
  order = np.argsort(draws, axis=1, kind='stable')
  in_order = np.take_along_axis(draws, order, axis=1)
  # A stable sort keeps equal draws in draw order, so the earliest comes first.
  first_sorted = np.concatenate(
      [np.ones_like(in_order[:, :1], bool), in_order[:, 1:] != in_order[:, :-1]], axis=1)
  first = np.empty_like(first_sorted)
  np.put_along_axis(first, order, first_sorted, axis=1)
  keep = first & (draws != targets[:, None])
  position = np.argsort(~keep, axis=1, kind='stable')[:, :num_negatives]
  return (np.take_along_axis(draws, position, axis=1),
          keep.sum(axis=1) >= num_negatives)


def _sample_block(rng: np.random.Generator, targets: np.ndarray, num_items: int,
                  num_negatives: int, cdf: np.ndarray | None) -> np.ndarray:
  """Draws with replacement, keeps each row's first distinct non-targets, and
  extends the draws of the rows that fall short (sampling without replacement)."""

  def draw(rows: int) -> np.ndarray:
    size = (rows, num_negatives + num_negatives // 2 + 8)
    if cdf is None:
      return rng.integers(1, num_items, size=size)
    return 1 + np.searchsorted(cdf, rng.integers(0, cdf[-1], size=size), side='right')

  negatives = np.empty((len(targets), num_negatives), np.int32)
  pending = np.arange(len(targets))
  draws = np.empty((len(targets), 0), np.int64)
  while pending.size:
    draws = np.concatenate([draws, draw(len(pending))], axis=1)
    picked, ok = _first_distinct(draws, targets[pending], num_negatives)
    negatives[pending[ok]] = picked[ok]
    pending, draws = pending[~ok], draws[~ok]
  return negatives


def sample_negatives(targets: np.ndarray, num_items: int, num_negatives: int = 100,
                     by: str = 'uniform', item_count: np.ndarray | None = None,
                     seed: int = 0) -> np.ndarray:
  """int32 [N, num_negatives]: distinct items in 1..num_items-1 other than each target.

  Draws are uniform (`by='uniform'`) or proportional to `item_count`
  (`by='popularity'`, items with count 0 never drawn), without replacement
  within a row. Deterministic for a seed.
  """
  targets = np.asarray(targets)
  if item_count is not None:
    item_count = np.asarray(item_count)
  _check_sampling(targets, num_items, num_negatives, by, item_count)
  cdf = np.cumsum(item_count[1:]) if by == 'popularity' else None
  blocks = [_sample_block(np.random.default_rng([seed, start]),
                          targets[start:start + _SAMPLE_BLOCK], num_items, num_negatives, cdf)
            for start in range(0, len(targets), _SAMPLE_BLOCK)]
  return np.concatenate(blocks) if blocks else np.empty((0, num_negatives), np.int32)


def with_negatives(batches: Iterable[dict], negatives: np.ndarray) -> Iterator[dict]:
  """Adds each example's row of `negatives` (indexed by the batch's 'index')."""
  for batch in batches:
    yield {**batch, 'negatives': negatives[np.maximum(batch['index'], 0)]}


def _ranks_and_weights(rank_fn: RankFn, params: Params,
                       batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
  # Dispatch every batch before reading any result back, so host and device
  # overlap. Batches split over processes (sharding.global_batch) come back whole.
  pending = [(rank_fn(params, batch), batch['weights']) for batch in batches]
  if not pending:
    raise ValueError('no evaluation batches')
  ranks, weights = zip(*map(sharding.to_host, pending))
  return np.concatenate(ranks), np.concatenate(weights)


def ranks_of(rank_fn: RankFn, params: Params, batches: Iterable[Batch]) -> np.ndarray:
  """int32 [num_examples]: the ranks of the rows with weight > 0, in batch order
  (example order for `pipeline.eval_batches`)."""
  ranks, weights = _ranks_and_weights(rank_fn, params, batches)
  return ranks[weights > 0]


def evaluate(rank_fn: RankFn, params: Params, batches: Iterable[Batch],
             ks: Sequence[int]) -> dict[str, float]:
  """`metrics_from_ranks` over all batches, plus 'num_examples'."""
  ranks, weights = _ranks_and_weights(rank_fn, params, batches)
  return {**metrics_from_ranks(ranks, weights, ks),
          'num_examples': int((weights > 0).sum())}
