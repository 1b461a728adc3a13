"""Recommender: item embedding -> backbone -> output head, chosen by a ModelSpec.

  params = init(spec, jax.random.key(0))
  hidden = model.apply({'params': params}, inputs, train=True,
                       rngs={'dropout': k1})
  nll = model.apply({'params': params}, hidden, targets, method='loss',
                    rngs={'sample': k2})  # 'sample' only for the sampled head.
  # CANet (routing.py): a sliced sub-model, or per-row route weights [B, R].
  hidden = model.apply({'params': params}, inputs, train=False,
                       route=routing.Route(64, 96, 2))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqcompress_jax.models import routing
from seqcompress_jax.models.blocks import AdaptiveSoftmax, BlockEmbedding
from seqcompress_jax.models.heads import FullSoftmax, SampledSoftmax, padded_init, padded_size
from seqcompress_jax.models.nextitnet import NextItNet
from seqcompress_jax.models.sasrec import SASRec
from seqcompress_jax.models.spec import ModelSpec

EMBED_INIT = nn.initializers.normal(stddev=0.02)


def item_embedding(spec: ModelSpec, features: int, **kwargs) -> nn.Embed:
  """An item embedding [V + padding, features] (spec.item_shards; the padded
  rows start at zero and no id looks them up)."""
  return nn.Embed(padded_size(spec.num_items, spec.item_shards), features,
                  dtype=spec.compute_dtype,
                  embedding_init=padded_init(EMBED_INIT, spec.num_items, 0), **kwargs)


class Recommender(nn.Module):
  """Submodules `embed`, `backbone` and `head`; ids in [0, V), 0 = PAD."""
  spec: ModelSpec

  def setup(self):
    s = self.spec
    if s.embedding == 'block':
      self.embed = BlockEmbedding(s.num_items, s.embed_dim, s.cutoffs, s.block_widths,
                                  dtype=s.compute_dtype, item_shards=s.item_shards)
    else:
      self.embed = item_embedding(s, s.embed_dim)
    self.backbone = {'nextitnet': NextItNet, 'sasrec': SASRec}[s.backbone](s)
    head_args = dict(num_items=s.num_items, features=s.hidden_dim, tied=s.tied,
                     dtype=s.compute_dtype, item_shards=s.item_shards)
    if s.head == 'adaptive':
      self.head = AdaptiveSoftmax(s.num_items, s.hidden_dim, s.cutoffs, s.block_widths,
                                  dtype=s.compute_dtype, capacity=s.tail_capacity,
                                  item_shards=s.item_shards, norm_chunk=s.norm_chunk)
    elif s.head == 'sampled':
      self.head = SampledSoftmax(num_samples=s.num_samples, sampler=s.sampler,
                                 **head_args)
    else:
      self.head = FullSoftmax(**head_args)

  def __call__(self, inputs: jax.Array, *, train: bool,
               route: routing.Route | jax.Array | None = None) -> jax.Array:
    """inputs [B, L] int32, left-padded -> hidden [B, L, hidden_dim].

    `route` picks a CANet sub-model (routing.choices): None is the full model;
    a static routing.Route the sliced sub-model (hidden [B, L, route.hidden_dim]);
    route weights [B, R] (one-hot rows, e.g. routing.straight_through) every
    row's route on the masked path (hidden zero beyond each row's H). The
    head methods below take either hidden width. Needs the 'dropout' rng
    stream when train and model.dropout > 0.
    """
    width = route.embed_dim if isinstance(route, routing.Route) else self.spec.embed_dim
    if self.spec.embedding == 'block':
      x = self.embed(inputs, width)
    else:
      x = self.embed(inputs)[..., :width]
    return self.backbone(x, inputs != 0, train=train, route=route)

  def loss(self, hidden: jax.Array, targets: jax.Array, *,
           log_q: jax.Array | None = None) -> jax.Array:
    """float32 NLL [B, L] of targets [B, L] (0 where targets == 0).

    Exact for the full head; the sampled head needs the 'sample' rng stream,
    and `log_q` [V] (unnormalised log popularity, finite for every item) for
    the 'popularity' sampler.
    """
    return self.head.nll(hidden, targets, self._table(), log_q)

  def rank_context(self, hidden: jax.Array) -> Any:
    """What `score` needs per sequence, computed once for all item chunks:
    the hidden state, plus the adaptive head's normalisers."""
    return self.head.prepare(hidden) if self.spec.head == 'adaptive' else hidden

  def score(self, context: Any, items: jax.Array) -> jax.Array:
    """context (hidden [B, H] or rank_context's) and items [B, C] or [C] ->
    float32 [B, C], monotone in log p(item)."""
    return self.head.score(context, items, self._table())

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., H] -> float32 logits [..., V]; PAD gets heads.PAD_LOGIT."""
    return self.head(hidden, self._table())

  def _table(self) -> jax.Array | None:
    """The output weight [V + padding, H] when tied, else None."""
    return self.embed.embedding if self.spec.tied else None


def init(spec: ModelSpec, rng: jax.Array) -> dict:
  """The 'params' collection (plain nested dicts, float32) of a new model."""
  inputs = jnp.zeros((1, 1), jnp.int32)  # No parameter depends on the length.
  variables = Recommender(spec).init(
      rng, inputs, method=lambda m, x: m.logits(m(x, train=False)))
  return variables['params']
