"""Block-wise adaptive input embedding and softmax (CpRec; Grave et al., 2017).

Ids are sorted by descending training frequency (0 = PAD, 1 = most frequent).
Cutoffs 0 < c1 < ... < cn = V split them into n blocks, block j = [c_{j-1}, c_j)
with c0 = 0: the head block (j = 1, PAD included) and the tails j = 2..n. Block
j has width d_j = max(1, d // factor^(j-1)), or explicit widths with d_1 = d:
frequent items get wide vectors, rare ones narrow. The same cutoffs and widths
serve the input and the output side; the two are never tied. With
`item_shards` > 1 each tail's table is padded along its item axis to a
multiple of it (heads.padded_size), as the full tables are.

  cutoffs = cutoffs_from_mass(item_count, (0.6, 0.85))  # Or check_cutoffs((7000, 15000), V).
  widths = block_widths(dim, len(cutoffs))
  embed = BlockEmbedding(V, dim, cutoffs, widths)
  head = AdaptiveSoftmax(V, hidden_dim, cutoffs, widths)
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from seqcompress_jax.models.heads import PAD_LOGIT, mask_padding, padded_init, padded_size

TABLE_INIT = nn.initializers.normal(stddev=0.02)
# Variance 1 / fan_in: a tail embedding E_j[v] @ P_j keeps the 0.02 scale of the
# head rows, and a tail logit (h @ Q_j) @ O_j the scale of a head logit h @ W_h.
PROJ_INIT = nn.initializers.lecun_normal()


def _as_int(value) -> int | None:
  """value as a Python int, or None when it is not an integer (bools are not)."""
  if isinstance(value, (bool, np.bool_)):
    return None
  try:
    return operator.index(value)
  except TypeError:
    return None


def check_cutoffs(cutoffs: Sequence[int], num_items: int) -> tuple[int, ...]:
  """Validated cutoffs (c1, ..., cn) with cn = num_items (V).

  The final V may be left out: (7000, 15000) and (7000, 15000, V) are the same
  three blocks, and () is one block (a plain embedding and full softmax).
  Raises ValueError naming `model.cutoffs` unless the cutoffs are integers,
  strictly increasing, at most V, and c1 >= 2 (the head holds PAD and an item).
  """
  values = [_as_int(c) for c in cutoffs]
  if any(value is None for value in values):
    raise ValueError(f'model.cutoffs: expected integers, got {cutoffs!r}')
  if values and values[-1] > num_items:
    raise ValueError(f'model.cutoffs: expected cutoffs <= num_items = {num_items}, '
                     f'got {cutoffs!r}')
  if not values or values[-1] < num_items:
    values.append(num_items)
  if values[0] < 2:
    raise ValueError(f'model.cutoffs: expected a first cutoff >= 2 (the head block '
                     f'holds PAD and at least one item), got {cutoffs!r}')
  if any(a >= b for a, b in zip(values, values[1:])):
    raise ValueError(f'model.cutoffs: expected strictly increasing cutoffs, got {cutoffs!r}')
  return tuple(values)


def block_widths(dim: int, num_blocks: int, factor: int = 4,
                 widths: Sequence[int] | None = None) -> tuple[int, ...]:
  """Widths (d_1, ..., d_n): d_j = max(1, dim // factor^(j-1)), or `widths` validated.

  Explicit widths must be num_blocks positive integers with widths[0] == dim.
  """
  if widths is None:
    if _as_int(factor) is None or factor < 1:
      raise ValueError(f'factor: expected a positive integer, got {factor!r}')
    return tuple(max(1, dim // factor**j) for j in range(num_blocks))
  values = _check_widths(widths, num_blocks)
  if values[0] != dim:
    raise ValueError(f'widths: expected widths[0] == dim = {dim}, got {widths!r}')
  return tuple(values)


def _check_widths(widths: Sequence[int], num_blocks: int) -> tuple[int, ...]:
  values = tuple(_as_int(w) for w in widths)
  if len(values) != num_blocks or any(w is None or w < 1 for w in values):
    raise ValueError(f'widths: expected {num_blocks} positive integers (one per block), '
                     f'got {widths!r}')
  return values


def cutoffs_from_mass(item_count: np.ndarray, mass: Sequence[float]) -> tuple[int, ...]:
  """Cutoffs whose blocks cover the given cumulative shares of interactions.

  Args:
    item_count: [V] training interactions per id, non-increasing over ids
      1..V-1 (frequency-sorted); entry 0 (PAD) is ignored.
    mass: strictly increasing shares in (0, 1): block 1 (the head) is the
      fewest most frequent items covering mass[0] of the interactions, blocks
      1-2 together cover mass[1], and so on; the last block takes the rest.

  Returns:
    (c1, ..., c_{len(mass)}, V), as check_cutoffs gives.

  Raises:
    ValueError: on bad inputs, or when a block would be empty (two shares
      reached at the same item, or a share that only the last item reaches).
      Blocks are never merged silently: that would change the architecture.
  """
  counts = np.asarray(item_count)
  if counts.ndim != 1 or counts.size < 2 or counts.dtype.kind not in 'iu':
    raise ValueError(f'item_count: expected a 1-D integer array [V] with V >= 2, '
                     f'got {counts.dtype} {counts.shape}')
  counts = counts[1:]
  if (counts < 0).any() or (np.diff(counts) > 0).any() or counts.sum() == 0:
    raise ValueError('item_count: expected non-negative counts, non-increasing over '
                     'ids 1..V-1 (frequency-sorted ids), not all zero')
  shares = [float(m) for m in mass]
  if not all(0 < m < 1 for m in shares) or any(a >= b for a, b in zip(shares, shares[1:])):
    raise ValueError(f'mass: expected strictly increasing shares in (0, 1), got {mass!r}')
  # Correctly rounded division is monotone, so a share written as a decimal
  # (0.3) is reached exactly where the true ratio equals it.
  covered = np.cumsum(counts) / counts.sum()
  # Block 1 = PAD plus the first k items, with covered[k - 1] >= m.
  cutoffs = [2 + int(np.searchsorted(covered, m, side='left')) for m in shares]
  num_items = counts.size + 1
  if cutoffs[-1] >= num_items or any(a >= b for a, b in zip(cutoffs, cutoffs[1:])):
    raise ValueError(f'mass: shares {mass!r} give cutoffs {cutoffs} over {num_items} ids, '
                     f'which leave a block empty; use fewer or further apart shares')
  return check_cutoffs(cutoffs, num_items)


def tail_shares(item_count: np.ndarray, cutoffs: Sequence[int]) -> tuple[float, ...]:
  """The share of the interactions `item_count` [V] (PAD's entry ignored) that
  falls in each tail block of `cutoffs`."""
  counts = np.asarray(item_count, np.float64)[1:]
  cutoffs = check_cutoffs(cutoffs, counts.size + 1)
  total = max(counts.sum(), 1.0)
  return tuple(float(counts[lower - 1:upper - 1].sum() / total)
               for lower, upper in _bounds(cutoffs)[1:])


def block_embedding_params(num_items: int, dim: int, cutoffs: Sequence[int],
                           widths: Sequence[int]) -> int:
  """Parameters of BlockEmbedding: c1 * dim + sum over tails of size_j * d_j + d_j * dim."""
  cutoffs = check_cutoffs(cutoffs, num_items)
  widths = block_widths(dim, len(cutoffs), widths=widths)
  tails = zip(_bounds(cutoffs)[1:], widths[1:])
  return cutoffs[0] * dim + sum((upper - lower) * w + w * dim for (lower, upper), w in tails)


def adaptive_softmax_params(num_items: int, features: int, cutoffs: Sequence[int],
                            widths: Sequence[int]) -> int:
  """Parameters of AdaptiveSoftmax: features * (c1 + n - 1) + sum over tails of
  features * d_j + d_j * size_j."""
  cutoffs = check_cutoffs(cutoffs, num_items)
  widths = _check_widths(widths, len(cutoffs))
  tails = zip(_bounds(cutoffs)[1:], widths[1:])
  head = features * (cutoffs[0] + len(cutoffs) - 1)
  return head + sum(features * w + w * (upper - lower) for (lower, upper), w in tails)


def _bounds(cutoffs: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """[(c_{j-1}, c_j)] for every block, the head's (0, c1) first."""
  return tuple(zip((0,) + cutoffs[:-1], cutoffs))


def _block_index(ids: jax.Array, bounds: tuple[tuple[int, int], ...]) -> jax.Array:
  """int32 [...]: the block of each id, 0 for the head, t = j - 1 for tail j."""
  lowers = jnp.asarray([lower for lower, _ in bounds[1:]], ids.dtype)
  return jnp.sum(ids[..., None] >= lowers, axis=-1, dtype=jnp.int32)


def _local(ids: jax.Array, lower: int, upper: int) -> jax.Array:
  """ids - lower clipped into [0, upper - lower): in-range row of a block's table."""
  return jnp.clip(ids - lower, 0, upper - lower - 1)


class BlockEmbedding(nn.Module):
  """Block-wise adaptive input embedding: ids [...] -> [..., dim].

  Parameters: `head` [c1, dim] (PAD's row included; the backbones zero PAD
  positions themselves) and, for each tail j = 2..n, `tail_{j}_table`
  [c_j - c_{j-1} (+ padding), d_j] and `tail_{j}_proj` [d_j, dim] (no bias);
  emb(v) = tail_{j}_table[v - c_{j-1}] @ tail_{j}_proj. Every block is looked
  up for every id with a clipped gather and selected by mask (static shapes),
  so each tail costs d_j * dim MACs per id. A `width` < dim (a CANet route)
  keeps the first `width` output dims: head[:, :width], tail projections
  [:, :width].
  """
  num_items: int
  dim: int
  cutoffs: tuple[int, ...]  # As check_cutoffs accepts.
  widths: tuple[int, ...]  # One per block, widths[0] == dim.
  dtype: DTypeLike = jnp.float32
  item_shards: int = 1  # Tail tables padded to a multiple of it.

  def setup(self):
    cutoffs = check_cutoffs(self.cutoffs, self.num_items)
    widths = block_widths(self.dim, len(cutoffs), widths=self.widths)
    self.bounds = _bounds(cutoffs)
    self.head = self.param('head', TABLE_INIT, (cutoffs[0], self.dim), jnp.float32)
    tails = list(enumerate(zip(self.bounds[1:], widths[1:]), start=2))
    self.tables = [self.param(f'tail_{j}_table', padded_init(TABLE_INIT, upper - lower, 0),
                              (padded_size(upper - lower, self.item_shards), width),
                              jnp.float32) for j, ((lower, upper), width) in tails]
    self.projs = [self.param(f'tail_{j}_proj', PROJ_INIT, (width, self.dim), jnp.float32)
                  for j, (_, width) in tails]

  def __call__(self, ids: jax.Array, width: int | None = None) -> jax.Array:
    """ids [...] -> [..., width] (default width: dim)."""
    ids = jnp.asarray(ids)
    width = self.dim if width is None else width
    block = _block_index(ids, self.bounds)[..., None]
    out = jnp.take(self.head[:, :width], _local(ids, *self.bounds[0]),
                   axis=0).astype(self.dtype)
    for tail, ((lower, upper), table, proj) in enumerate(
        zip(self.bounds[1:], self.tables, self.projs), start=1):
      rows = jnp.take(table, _local(ids, lower, upper), axis=0)
      emb = jnp.einsum('...d,de->...e', rows.astype(self.dtype),
                       proj[:, :width].astype(self.dtype),
                       preferred_element_type=jnp.float32)
      out = jnp.where(block == tail, emb.astype(self.dtype), out)
    return out


def _check_untied(table: jax.Array | None) -> None:
  if table is not None:
    raise ValueError('AdaptiveSoftmax is never tied: table must be None')


def _take_items(values: jax.Array, items: jax.Array) -> jax.Array:
  """values [B, N], items [C] or [B, C] (in [0, N)) -> [B, C]."""
  if items.ndim == 1:
    return jnp.take(values, items, axis=1)
  return jnp.take_along_axis(values, items, axis=1)


class AdaptiveSoftmax(nn.Module):
  """Block-wise adaptive softmax: log p(item) [..., V] from hidden [..., H].

  Parameters (no biases): `head` W_h [H, c1 + n - 1], the logits of the c1
  head ids and then of one cluster token per tail (block j's at c1 + j - 2);
  for each tail j = 2..n, `tail_{j}_proj` Q_j [H, d_j] and `tail_{j}_out`
  O_j [d_j, c_j - c_{j-1} (+ padding to a multiple of `item_shards`)].
  log p(v) = log_softmax(h @ W_h)[v] for a head id,
  log_softmax(h @ W_h)[cluster_j] + log_softmax((h @ Q_j) @ O_j)[v - c_{j-1}]
  for an id of tail j. PAD gets no probability: its head logit is masked, and
  wherever log-probabilities are returned it is at heads.PAD_LOGIT.

  The methods mirror heads.FullSoftmax; their `table` argument exists for that
  API only and must be None (the adaptive softmax is never tied). widths[0]
  is not used: the head's width is `features`. In the code, tail t = j - 1
  (1..n-1) is block j. Hidden states narrower than `features` (a CANet
  route) use the first hidden.shape[-1] rows of the head and tail projections.
  """
  num_items: int
  features: int
  cutoffs: tuple[int, ...]  # As check_cutoffs accepts.
  widths: tuple[int, ...]  # One per block.
  dtype: DTypeLike = jnp.float32
  # Tail items per step of prepare's and topk's tail passes (8,192 was the
  # fastest of 2k-64k at V = 1M on CPU: the chunk's logits stay in cache).
  norm_chunk: int = 1 << 13
  # Per tail, the share of positions whose tail loss nll computes (see nll);
  # () = every position.
  capacity: tuple[float, ...] = ()
  # Tail outputs padded to a multiple of it; the tail passes scan each of
  # these equal parts of a tail on its own (_scan_tail).
  item_shards: int = 1

  def setup(self):
    cutoffs = check_cutoffs(self.cutoffs, self.num_items)
    widths = _check_widths(self.widths, len(cutoffs))
    self.bounds = _bounds(cutoffs)
    self.head = self.param('head', PROJ_INIT, (self.features, cutoffs[0] + len(cutoffs) - 1),
                           jnp.float32)
    tails = list(enumerate(zip(self.bounds[1:], widths[1:]), start=2))
    self.projs = [self.param(f'tail_{j}_proj', PROJ_INIT, (self.features, width),
                             jnp.float32) for j, (_, width) in tails]
    self.outs = [self.param(f'tail_{j}_out', padded_init(PROJ_INIT, upper - lower, 1),
                            (width, padded_size(upper - lower, self.item_shards)), jnp.float32)
                 for j, ((lower, upper), width) in tails]

  def __call__(self, hidden: jax.Array, table: jax.Array | None = None) -> jax.Array:
    """The log-probabilities of log_probs, as FullSoftmax's logits."""
    _check_untied(table)
    return self.log_probs(hidden)

  def log_probs(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., H] -> float32 exact log p [..., V]; PAD at PAD_LOGIT."""
    head = self._head_log_probs(hidden)
    parts = [head[..., :self._num_head_ids]]
    for tail in range(1, len(self.bounds)):
      parts.append(self._cluster(head, tail)[..., None] + self._tail_log_probs(hidden, tail))
    return jnp.concatenate(parts, axis=-1).at[..., 0].set(PAD_LOGIT)

  def nll(self, hidden: jax.Array, targets: jax.Array, table: jax.Array | None = None,
          log_q: jax.Array | None = None) -> jax.Array:
    """Exact NLL [...] of targets [...]; 0 where targets == 0.

    Head CE of the target (or of its cluster token) plus, for a tail target,
    the CE within its tail: H * d_j + d_j * size_j MACs per position of tail
    j, against H * size_j for a full softmax. Without `capacity`, every tail's
    log-softmax is computed at every position and selected by mask. With it,
    tail j's is computed only for the positions whose target is in tail j,
    gathered into a buffer of ceil(capacity[j] * positions) + 8 rows (static
    shapes); a batch with more such positions falls back, through lax.cond, to
    every position. Either way the loss and its gradient are exact.
    """
    _check_untied(table)
    del log_q  # Unused: no proposal.
    valid = targets > 0
    targets = jnp.where(valid, targets, 1)  # Finite stand-in, masked below.
    block = _block_index(targets, self.bounds)
    head_index = jnp.where(block == 0, targets, self._num_head_ids + block - 1)
    head = self._head_log_probs(hidden)
    nll = -jnp.take_along_axis(head, head_index[..., None], axis=-1)[..., 0]
    for tail in range(1, len(self.bounds)):
      nll += self._tail_nll(hidden, targets, block == tail, tail)
    return jnp.where(valid, nll, 0.0)

  def _tail_nll(self, hidden: jax.Array, targets: jax.Array, in_tail: jax.Array,
                tail: int) -> jax.Array:
    """-log p(target | its cluster) [...] where `in_tail`, else 0."""
    lower, upper = self.bounds[tail]

    def ce(rows_hidden: jax.Array, rows_targets: jax.Array) -> jax.Array:
      logits = self._tail_logits(rows_hidden, tail)
      local = _local(rows_targets, lower, upper)[..., None]
      target_logit = jnp.take_along_axis(logits, local, axis=-1)[..., 0]
      return jax.nn.logsumexp(logits, axis=-1) - target_logit

    def everywhere() -> jax.Array:
      return jnp.where(in_tail, ce(hidden, targets), 0.0)

    positions = in_tail.size
    rows = (positions if not self.capacity
            else min(positions, math.ceil(self.capacity[tail - 1] * positions) + 8))
    if rows >= positions:
      return everywhere()

    def gathered() -> jax.Array:
      index = jnp.nonzero(in_tail.reshape(-1), size=rows, fill_value=positions)[0]
      inside = jnp.minimum(index, positions - 1)  # Padding rows: computed, dropped.
      flat_hidden = hidden.reshape(positions, hidden.shape[-1])
      values = ce(flat_hidden[inside], targets.reshape(-1)[inside])
      return (jnp.zeros(positions, values.dtype).at[index].set(values, mode='drop')
              .reshape(in_tail.shape))

    return jax.lax.cond(in_tail.sum() <= rows, gathered, everywhere)

  def prepare(self, hidden: jax.Array) -> dict[str, jax.Array]:
    """hidden [B, H] -> what `score` needs, computed once for many item chunks.

    'hidden' [B, H]; 'head' [B, c1 + n - 1], the head log-softmax; 'tail_norm'
    [B, n - 1], the log-normaliser (logsumexp of the logits) of each tail,
    taken over `norm_chunk` items at a time: memory O(B * norm_chunk).
    """
    norms = [self._tail_log_norm(hidden, tail) for tail in range(1, len(self.bounds))]
    return {'hidden': hidden, 'head': self._head_log_probs(hidden),
            'tail_norm': jnp.stack(norms, axis=-1) if norms
                         else jnp.zeros((hidden.shape[0], 0), jnp.float32)}

  def score(self, hidden: jax.Array | dict[str, jax.Array], items: jax.Array,
            table: jax.Array | None = None) -> jax.Array:
    """hidden [B, H] or prepare(hidden), items [C] or [B, C] -> float32 log p [B, C].

    Exact log p(item) (PAD at PAD_LOGIT), equal to log_probs gathered up to
    rounding. Every tail's logit is computed for every item and selected by
    mask: sum_j d_j MACs per (row, item) besides the gathers.
    """
    _check_untied(table)
    prepared = hidden if isinstance(hidden, dict) else self.prepare(hidden)
    hidden, head, norm = prepared['hidden'], prepared['head'], prepared['tail_norm']
    block = _block_index(items, self.bounds)
    scores = _take_items(head, _local(items, *self.bounds[0]))
    equation = 'bd,dc->bc' if items.ndim == 1 else 'bd,dbc->bc'
    for tail, (lower, upper) in enumerate(self.bounds[1:], start=1):
      low = self._einsum('bh,hd->bd', hidden, self.projs[tail - 1])
      weights = jnp.take(self.outs[tail - 1], _local(items, lower, upper), axis=1)
      logits = self._einsum(equation, low, weights)
      tail_scores = (self._cluster(head, tail)[:, None]
                     + (logits - norm[:, tail - 1, None]))
      scores = jnp.where(block == tail, tail_scores, scores)
    return jnp.where(items == 0, PAD_LOGIT, scores)

  def topk(self, hidden: jax.Array, k: int,
           capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The exact top k of log_probs(hidden) without evaluating every tail.

    Let t be a row's k-th best head item. An item of tail j has
    log p <= log p(cluster_j) + b_j, where b_j <= 0 bounds the tail's best
    log p(item | cluster_j) (_tail_bound), so tail j can only enter the top k
    when log p(cluster_j) + b_j > t; other tails are skipped (with a head of
    fewer than k items, t = -inf and no tail is skipped). With b_j = 0 this is
    CpRec's rule (a tail whose cluster token is in the head's top k) made
    exact; that rule alone misses an item when cluster tokens crowd head items
    out of the top k, and on a trained model opens nearly every tail, as a
    cluster token carries a tail's whole mass.

    A needed tail's top k and normaliser come from one pass over its items,
    `norm_chunk` at a time, so no [B, size] array is built. Per tail, the
    rows that need it are gathered into a buffer of `capacity`
    rows (default max(8, B // 4)), the only rows whose tail log-softmax is
    computed; when more rows need it, lax.switch runs that tail for the whole
    batch instead, and when none does, not at all. capacity >= B always
    computes every tail for every row.
    The saving is in the skipped tails: a tail holding much probability mass
    is needed by most rows, and then costs what it costs in log_probs.

    Args:
      hidden: [B, H].
      k: in [1, V - 1].
      capacity: rows per tail in the gathered buffer.

    Returns:
      float32 log p [B, k], descending, and their int32 ids [B, k] (never PAD).
      Ties may be ordered differently from lax.top_k(log_probs).
    """
    capacity = max(8, hidden.shape[0] // 4) if capacity is None else capacity
    if _as_int(capacity) is None or capacity < 1:
      raise ValueError(f'capacity: expected a positive integer, got {capacity!r}')
    head, (scores, items), opened = self._head_top(hidden, k)
    candidates = [(scores, items)]
    for tail in range(1, len(self.bounds)):
      candidates.append(self._tail_topk(hidden, self._cluster(head, tail), opened[:, tail - 1],
                                        tail, k, capacity))
    scores, index = jax.lax.top_k(jnp.concatenate([s for s, _ in candidates], axis=1), k)
    items = jnp.concatenate([i for _, i in candidates], axis=1)
    return scores, jnp.take_along_axis(items, index, axis=1).astype(jnp.int32)

  def tails_to_open(self, hidden: jax.Array, k: int) -> jax.Array:
    """bool [B, n - 1]: the tails topk(hidden, k) evaluates for each row."""
    return self._head_top(hidden, k)[2]

  def _head_top(self, hidden: jax.Array,
                k: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    """The head's log-softmax [B, c1 + n - 1], its top min(k, c1 - 1) items
    (log p, ids) and the tails [B, n - 1] that may hold a better item than the
    k-th of those (all of them when the head has fewer than k items)."""
    if _as_int(k) is None or not 1 <= k <= self.num_items - 1:
      raise ValueError(f'k: expected an integer in [1, {self.num_items - 1}] '
                       f'(V - 1 items), got {k!r}')
    head = self._head_log_probs(hidden)
    head_k = min(k, self._num_head_ids - 1)  # PAD, masked, is never picked.
    scores, items = jax.lax.top_k(head[:, :self._num_head_ids], head_k)
    # The min, not scores[:, -1]: XLA on CPU would turn that slice into a full sort.
    threshold = (scores.min(axis=1) if head_k == k
                 else jnp.full((hidden.shape[0],), -jnp.inf))
    best = [self._cluster(head, tail) + self._tail_bound(hidden, tail)  # >= its best item.
            for tail in range(1, len(self.bounds))]
    opened = (jnp.stack(best, axis=1) > threshold[:, None] if best
              else jnp.zeros((hidden.shape[0], 0), bool))
    return head, (scores, items), opened

  def _tail_topk(self, hidden: jax.Array, cluster: jax.Array, needed: jax.Array,
                 tail: int, k: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The top min(k, size) of tail `tail` for the `needed` rows [B] (others at
    PAD_LOGIT, or with their true scores when the whole batch is computed)."""
    batch = hidden.shape[0]
    lower, upper = self.bounds[tail]
    tail_k = min(k, upper - lower)

    def top(rows_hidden, rows_cluster):
      scores, local = self._tail_top(rows_hidden, tail, tail_k)
      return rows_cluster[:, None] + scores, local + lower

    if capacity >= batch:
      return top(hidden, cluster)

    def skipped():
      return (jnp.full((batch, tail_k), PAD_LOGIT),
              jnp.zeros((batch, tail_k), jnp.int32))

    def gathered():
      rows = jnp.nonzero(needed, size=capacity, fill_value=batch)[0]  # Pad: out of range.
      inside = jnp.minimum(rows, batch - 1)
      scores, items = top(hidden[inside], cluster[inside])
      return (jnp.full((batch, tail_k), PAD_LOGIT).at[rows].set(scores, mode='drop'),
              jnp.zeros((batch, tail_k), items.dtype).at[rows].set(items, mode='drop'))

    count = needed.sum()
    branch = jnp.where(count == 0, 0, jnp.where(count <= capacity, 1, 2))
    return jax.lax.switch(branch, [skipped, gathered, lambda: top(hidden, cluster)])

  def _tail_bound(self, hidden: jax.Array, tail: int) -> jax.Array:
    """hidden [B, H] -> an upper bound [B], <= 0, on max over the tail's items
    of log p(item | cluster) as _tail_log_probs computes it, in O(G d) per row.

    The tail's items fall in G groups of about sqrt(part) consecutive ids
    within each of its item_shards parts. With u the row's tail projection and
    c_g, r_g, n_g a group's mean item vector, radius and size: an item's logit
    u.w <= u.c_g + |u| r_g (Cauchy-Schwarz), and the normaliser
    logsumexp(u.w) >= logsumexp_g(u.c_g + log n_g) (Jensen within each
    group). The group tables cost one pass over the tail's items per call.
    The slack covers the rounding of logits computed in bfloat16 (or TF32).
    """
    lower, upper = self.bounds[tail]
    out = self.outs[tail - 1].astype(jnp.float32)
    width, shards = out.shape[0], self.item_shards
    part = out.shape[1] // shards
    group = math.isqrt(part - 1) + 1  # ceil(sqrt(part))
    groups = -(-part // group)
    index = (np.arange(shards)[:, None] * part
             + np.arange(groups * group)[None, :])  # Local ids [S, G * g] ...
    valid = ((np.arange(groups * group) < part)[None, :] & (index < upper - lower)).reshape(
        shards, groups, group)  # ... inside the part and the tail.
    count = valid.sum(axis=2)  # [S, G], static.
    items = jnp.pad(out.reshape(width, shards, part),
                    ((0, 0), (0, 0), (0, groups * group - part))).reshape(
                        width, shards, groups, group)
    items = jnp.where(valid, items, 0.0)
    centre = items.sum(axis=3) / np.maximum(count, 1)  # [d, S, G]
    radius = jnp.sqrt(jnp.max(jnp.where(valid, ((items - centre[..., None]) ** 2).sum(axis=0),
                                        0.0), axis=2))  # [S, G]
    low = self._einsum('bh,hd->bd', hidden, self.projs[tail - 1])
    dots = jnp.einsum('bd,dsg->bsg', low, centre, precision=jax.lax.Precision.HIGHEST)
    norm = jnp.linalg.norm(low, axis=-1)
    present = count > 0
    best = jnp.max(jnp.where(present, dots + norm[:, None, None] * radius, -jnp.inf),
                   axis=(1, 2))
    normaliser = jax.nn.logsumexp(jnp.where(present, dots + np.log(np.maximum(count, 1)),
                                            -jnp.inf), axis=(1, 2))
    rounding = 2.0 ** -6 if jnp.dtype(self.dtype) == jnp.bfloat16 else 2.0 ** -8
    reach = norm * jnp.sqrt(jnp.max((items ** 2).sum(axis=0)))  # >= any |logit|.
    return jnp.minimum(best - normaliser + rounding * reach + 1e-4, 0.0)

  @property
  def _num_head_ids(self) -> int:
    return self.bounds[0][1]

  def _cluster(self, head: jax.Array, tail: int) -> jax.Array:
    """log p [...] of the cluster token of tail `tail` (block tail + 1)."""
    return head[..., self._num_head_ids + tail - 1]

  def _head_log_probs(self, hidden: jax.Array) -> jax.Array:
    logits = self._einsum('...h,hv->...v', hidden, self.head)
    return jax.nn.log_softmax(logits.at[..., 0].set(PAD_LOGIT), axis=-1)

  def _tail_logits(self, hidden: jax.Array, tail: int) -> jax.Array:
    """Logits [..., size + padding] of tail `tail`'s items, the padding at PAD_LOGIT."""
    lower, upper = self.bounds[tail]
    low = self._einsum('...h,hd->...d', hidden, self.projs[tail - 1])
    return mask_padding(self._einsum('...d,dv->...v', low, self.outs[tail - 1]), upper - lower)

  def _scan_tail(self, hidden: jax.Array, tail: int, fn, init):
    """Folds fn(carry, logits [B, S, chunk], first [S]) over the tail's items.

    The tail's (padded) item axis is S = item_shards equal parts, as a mesh
    splits it over `model`; each step takes the next `chunk` items of every
    part (S * chunk ~ norm_chunk items, at least one a part), `first`
    being their first local ids, so that a device scans only its own parts
    and no tail row is gathered. Logits beyond the tail or a part's end are
    -inf. Memory O(B * norm_chunk) whatever the tail's size, and a chunk's
    logits stay in cache."""
    lower, upper = self.bounds[tail]
    low = self._einsum('bh,hd->bd', hidden, self.projs[tail - 1])
    out = self.outs[tail - 1]
    width, shards = out.shape[0], self.item_shards
    part = out.shape[1] // shards
    chunk = min(part, max(1, self.norm_chunk // shards))  # A small part is one chunk.
    num_chunks = -(-part // chunk)
    parts = jnp.pad(out.reshape(width, shards, part),
                    ((0, 0), (0, 0), (0, num_chunks * chunk - part)))
    chunks = parts.reshape(width, shards, num_chunks, chunk).transpose(2, 0, 1, 3)
    part_first = jnp.arange(shards, dtype=jnp.int32) * part

    def step(carry, index_and_weights):
      index, weights = index_and_weights
      offset = index * chunk + jnp.arange(chunk, dtype=jnp.int32)  # Within a part.
      inside = (offset < part) & (part_first[:, None] + offset < upper - lower)
      logits = jnp.where(inside, self._einsum('bd,dsc->bsc', low, weights), -jnp.inf)
      return fn(carry, logits, part_first + index * chunk), None

    indices = jnp.arange(num_chunks, dtype=jnp.int32)
    return jax.lax.scan(step, init, (indices, chunks))[0]

  def _tail_log_norm(self, hidden: jax.Array, tail: int) -> jax.Array:
    """hidden [B, H] -> logsumexp [B] of the tail's logits, chunk by chunk."""
    norms = self._scan_tail(
        hidden, tail, lambda norm, logits, _: jnp.logaddexp(
            norm, jax.nn.logsumexp(logits, axis=-1)),
        jnp.full((hidden.shape[0], self.item_shards), -jnp.inf))
    return jax.nn.logsumexp(norms, axis=-1)

  def _tail_top(self, hidden: jax.Array, tail: int, k: int) -> tuple[jax.Array, jax.Array]:
    """The top k [B, k] of log p(item | cluster) within the tail and their
    local ids, in one pass over its items, chunk by chunk: the top k of each
    part, then of their union."""

    def merge(carry, logits, first):
      norm, best, best_ids = carry
      best, index = jax.lax.top_k(jnp.concatenate([best, logits], axis=-1), k)
      kept = jnp.take_along_axis(best_ids, jnp.minimum(index, k - 1), axis=-1)
      best_ids = jnp.where(index < k, kept, first[:, None] + index - k)
      return jnp.logaddexp(norm, jax.nn.logsumexp(logits, axis=-1)), best, best_ids

    batch, shards = hidden.shape[0], self.item_shards
    norm, best, ids = self._scan_tail(
        hidden, tail, merge, (jnp.full((batch, shards), -jnp.inf),
                              jnp.full((batch, shards, k), -jnp.inf),
                              jnp.zeros((batch, shards, k), jnp.int32)))
    best, index = jax.lax.top_k(best.reshape(batch, shards * k), k)
    ids = jnp.take_along_axis(ids.reshape(batch, shards * k), index, axis=-1)
    return best - jax.nn.logsumexp(norm, axis=-1)[:, None], ids

  def _tail_log_probs(self, hidden: jax.Array, tail: int) -> jax.Array:
    """log p(item | cluster) [..., size] within tail `tail`, as score computes it."""
    lower, upper = self.bounds[tail]
    logits = self._tail_logits(hidden, tail)
    return (logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))[..., :upper - lower]

  def _einsum(self, equation: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """x's last axis contracted with weight's first, of which the first
    x.shape[-1] entries are used."""
    return jnp.einsum(equation, x.astype(self.dtype),
                      weight[:x.shape[-1]].astype(self.dtype),
                      preferred_element_type=jnp.float32)
