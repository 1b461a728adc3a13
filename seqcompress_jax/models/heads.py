"""Output heads: logits h @ W + b over all items, trained by full or sampled softmax.

W is [hidden_dim, V] (`kernel`), or the input embedding table transposed when
tied (passed in at call time; the head then stores only `bias`). PAD (id 0)
is never a prediction: its logit is PAD_LOGIT wherever logits or scores are
returned.

Item tables may be padded along their item axis (ModelSpec.item_shards: cut
into that many equal parts, so that a device mesh can split them): the
padding starts at zero (`padded_init`), its logits are PAD_LOGIT inside the
loss (`mask_padding`), and nothing returned includes it.

The sampled softmax draws S negatives per step, shared by every position,
from a proposal Q over items 1..V-1 (with replacement), subtracts log(S Q(i))
from every logit it uses, the target's included (Jean et al., 2015; Bengio
and Senecal, 2008), and masks negatives equal to the target. With S = V - 1
and a uniform Q every S Q(i) = 1: drawing each item once gives the exact loss.
"""

from __future__ import annotations

import math

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

# Finite, so that masked entries keep finite gradients and 0 * PAD_LOGIT = 0.
PAD_LOGIT = -1e30


Initializer = Callable[..., jax.Array]


def padded_size(size: int, shards: int) -> int:
  """`size` rounded up to a multiple of `shards`: the length of an item axis
  of `size` items cut into `shards` equal parts, the last ones padded."""
  return -(-size // shards) * shards


def padded_init(init: Initializer, size: int, axis: int) -> Initializer:
  """`init` for a table whose `axis` may be padded beyond `size` items: the
  first `size` entries are what `init` draws for the unpadded table (so a
  padded model starts where the unpadded one does), the padding zeros."""

  def padded(key: jax.Array, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
             ) -> jax.Array:
    real = list(shape)
    real[axis] = size
    values = init(key, tuple(real), dtype)
    widths = [(0, 0)] * len(shape)
    widths[axis] = (0, shape[axis] - size)
    return jnp.pad(values, widths)

  return padded


def mask_padding(logits: jax.Array, size: int) -> jax.Array:
  """logits [..., N] with the padding beyond the first `size` items at
  PAD_LOGIT (unchanged when N == size)."""
  if logits.shape[-1] == size:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1]) < size, logits, PAD_LOGIT)


def popularity_log_probs(log_q: jax.Array) -> jax.Array:
  """Unnormalised log weights [V] -> log-probabilities over 1..V-1 (PAD: -inf)."""
  log_q = jnp.asarray(log_q, jnp.float32).at[0].set(-jnp.inf)
  return log_q - jax.nn.logsumexp(log_q)


def proposal_log_prob(sampler: str, items: jax.Array, num_items: int,
                      log_q: jax.Array | None = None) -> jax.Array:
  """log Q(items) of a proposal over 1..V-1; -inf for PAD.

  'log_uniform': Q(k) = log((k+1)/k) / log(V) (Zipfian over frequency-sorted
  ids); 'uniform': 1/(V-1); 'popularity': `log_q`, as from popularity_log_probs.
  """
  items = jnp.asarray(items)
  if sampler == 'log_uniform':
    log_p = (jnp.log(jnp.log1p(1.0 / jnp.maximum(items, 1).astype(jnp.float32)))
             - math.log(math.log(num_items)))
  elif sampler == 'uniform':
    log_p = jnp.full(items.shape, -math.log(num_items - 1), jnp.float32)
  elif sampler == 'popularity':
    log_p = log_q[items]
  else:
    raise ValueError(f'unknown sampler {sampler!r}')
  return jnp.where(items > 0, log_p, -jnp.inf)


def sample_negatives(rng: jax.Array, sampler: str, num_samples: int,
                     num_items: int, log_q: jax.Array | None = None) -> jax.Array:
  """int32 [num_samples] ids drawn from the proposal with replacement."""
  if sampler == 'log_uniform':  # Inverse CDF: floor(V^u) has P(k) = Q(k).
    u = jax.random.uniform(rng, (num_samples,))
    ids = jnp.floor(jnp.exp(u * math.log(num_items)))
  elif sampler == 'uniform':
    ids = jax.random.randint(rng, (num_samples,), 1, num_items)
  elif sampler == 'popularity':  # Inverse CDF: O(V + S log V) memory and time.
    cdf = jnp.cumsum(jnp.exp(log_q))
    u = jax.random.uniform(rng, (num_samples,)) * cdf[-1]
    ids = jnp.searchsorted(cdf, u, side='right')
  else:
    raise ValueError(f'unknown sampler {sampler!r}')
  return jnp.clip(ids, 1, num_items - 1).astype(jnp.int32)


def sampled_softmax_nll(target_logit: jax.Array, negative_logits: jax.Array,
                        target_log_q: jax.Array, negative_log_q: jax.Array,
                        hits: jax.Array) -> jax.Array:
  """Corrected sampled-softmax NLL [...] of the target among S negatives.

  Args:
    target_logit: [...] logit of the target.
    negative_logits: [..., S] logits of the negatives.
    target_log_q: [...] log Q(target).
    negative_log_q: [S] (or broadcastable) log Q of the negatives.
    hits: [..., S] True where a negative is the target (masked out).
  """
  log_s = math.log(negative_logits.shape[-1])
  target = target_logit - (log_s + target_log_q)
  negatives = jnp.where(hits, PAD_LOGIT,
                        negative_logits - (log_s + negative_log_q))
  all_logits = jnp.concatenate([target[..., None], negatives], axis=-1)
  return jax.nn.logsumexp(all_logits, axis=-1) - target


class FullSoftmax(nn.Module):
  """Logits over all V items, trained with the exact cross-entropy.

  The item axis of `kernel` and `bias` (and of a tied table) is padded to a
  multiple of `item_shards` (padded_size)."""
  num_items: int
  features: int
  tied: bool = False
  dtype: DTypeLike = jnp.float32
  item_shards: int = 1

  def setup(self):
    size = padded_size(self.num_items, self.item_shards)
    if not self.tied:
      self.kernel = self.param(
          'kernel', padded_init(nn.initializers.lecun_normal(), self.num_items, 1),
          (self.features, size), jnp.float32)
    self.bias = self.param('bias', nn.initializers.zeros, (size,), jnp.float32)

  def __call__(self, hidden: jax.Array,
               table: jax.Array | None = None) -> jax.Array:
    """hidden [..., H] -> float32 logits [..., V], PAD at PAD_LOGIT.

    `table` is the input embedding table [V + padding, H], required iff tied. Hidden
    states narrower than `features` (a CANet route) use the weights' first
    hidden.shape[-1] features, here and in every method below.
    """
    return self._padded_logits(hidden, table)[..., :self.num_items]

  def _padded_logits(self, hidden: jax.Array, table: jax.Array | None) -> jax.Array:
    """Logits [..., V + padding], PAD and the padding at PAD_LOGIT."""
    width = hidden.shape[-1]
    if self.tied:
      weight, equation = table[:, :width], '...h,vh->...v'
    else:
      weight, equation = self.kernel[:width], '...h,hv->...v'
    logits = self._einsum(equation, hidden, weight) + self.bias
    return mask_padding(logits, self.num_items).at[..., 0].set(PAD_LOGIT)

  def score(self, hidden: jax.Array, items: jax.Array,
            table: jax.Array | None = None) -> jax.Array:
    """hidden [B, H], items [B, C] or [C] -> float32 logits [B, C] of those items."""
    equation = 'bh,ch->bc' if items.ndim == 1 else 'bh,bch->bc'
    scores = self._item_logits(equation, hidden, items, table)
    return jnp.where(items == 0, PAD_LOGIT, scores)

  def nll(self, hidden: jax.Array, targets: jax.Array,
          table: jax.Array | None = None,
          log_q: jax.Array | None = None) -> jax.Array:
    """Exact cross-entropy [...] of targets [...]; 0 where targets == 0."""
    del log_q  # Unused: no proposal.
    logits = self._padded_logits(hidden, table)  # Split over `model` when sharded.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    return jnp.where(targets > 0, nll, 0.0)

  def _einsum(self, equation: str, hidden: jax.Array,
              weight: jax.Array) -> jax.Array:
    return jnp.einsum(equation, hidden.astype(self.dtype), weight.astype(self.dtype),
                      preferred_element_type=jnp.float32)

  def _item_logits(self, equation: str, hidden: jax.Array, items: jax.Array,
                   table: jax.Array | None) -> jax.Array:
    """Logits of the given items; the weights enter `equation` as [*items.shape, H]."""
    width = hidden.shape[-1]
    if self.tied:
      weights = jnp.take(table[:, :width], items, axis=0)
    else:
      weights = jnp.moveaxis(jnp.take(self.kernel[:width], items, axis=1), 0, -1)
    return self._einsum(equation, hidden, weights) + self.bias[items]


class SampledSoftmax(FullSoftmax):
  """The same logits, trained with the log-Q-corrected sampled softmax."""
  num_samples: int = 1024
  sampler: str = 'log_uniform'

  def nll(self, hidden: jax.Array, targets: jax.Array,
          table: jax.Array | None = None,
          log_q: jax.Array | None = None) -> jax.Array:
    """Sampled-softmax NLL [...]; 0 where targets == 0.

    Negatives come from the 'sample' rng stream. `log_q` [V]: unnormalised
    log popularity, finite for every item (e.g. log(count + 1)), required by
    the 'popularity' sampler, else unused.
    """
    if self.sampler == 'popularity':
      if log_q is None:
        raise ValueError("model.sampler 'popularity' needs log_q at call time")
      log_q = popularity_log_probs(log_q)
    negatives = sample_negatives(self.make_rng('sample'), self.sampler,
                                 self.num_samples, self.num_items, log_q)
    valid = targets > 0
    targets = jnp.where(valid, targets, 1)  # Finite stand-in, masked below.
    nll = sampled_softmax_nll(
        self._item_logits('...h,...h->...', hidden, targets, table),
        self._item_logits('...h,sh->...s', hidden, negatives, table),
        proposal_log_prob(self.sampler, targets, self.num_items, log_q),
        proposal_log_prob(self.sampler, negatives, self.num_items, log_q),
        hits=targets[..., None] == negatives)
    return jnp.where(valid, nll, 0.0)
