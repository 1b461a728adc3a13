"""SASRec: a causal pre-LN Transformer over the item sequence.

The (projected) item embedding is added to a learned position embedding
without scaling by sqrt(embed_dim): both are initialised with stddev 0.02, so
neither dominates at the start, and every block normalises its input. Position
ids are 0..L-1 over the whole left-padded window.

Attention is causal and skips PAD keys; each query may always attend to
itself, so a PAD query whose earlier keys are all PAD has one visible key (no
NaN, no uniform attention over the future), and the model stays strictly causal.

Layers 2i and 2i + 1 are the two layer slots of block i of a sharing schedule
(model.sharing, see sharing.py): only the unique attention + FFN weights are
stored, at `layer_{s}`, and layer l applies set schedule[l]. LayerNorms are
never shared: `norm_{l}_attn`, `norm_{l}_ffn` and `final_norm`.

A CANet route (routing.py) slices every layer: hidden size H keeps the first
H channels, the first H / heads dims of every head and the first
ffn_dim * H / hidden_dim FFN units; layers l >= D are skipped (identity).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from seqcompress_jax.models import routing, sharing
from seqcompress_jax.models.spec import ModelSpec

LN_EPSILON = 1e-8
POSITION_INIT = nn.initializers.normal(stddev=0.02)


def attention_mask(valid: jax.Array) -> jax.Array:
  """valid [B, L] (non-PAD) -> [B, 1, L, L]: key <= query, key valid or = query."""
  length = valid.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return (causal & (valid[:, None, :] | jnp.eye(length, dtype=bool)))[:, None]


class Attention(nn.Module):
  """Multi-head dot-product attention: flax's MultiHeadDotProductAttention
  (parameters `query`, `key`, `value` [features, heads, features / heads] and
  `out`, with biases; float32 softmax; dropout on the weights) made sliceable.

  A route of hidden size h keeps the first h / heads dims of every head, and
  the scores keep the full model's scale 1 / sqrt(features / heads), as the
  public CANet code: then a sub-model is the full model with channels zeroed,
  and the masked and sliced paths compute the same function.
  """
  num_heads: int
  features: int
  dropout: float = 0.0
  dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, inputs: jax.Array, mask: jax.Array, *,
               train: bool, hidden: routing.Choice | None = None) -> jax.Array:
    """queries [B, Lq, h], inputs [B, L, h], mask [B, 1, Lq, L] -> [B, Lq, h]."""
    hidden = routing.Choice.full(self.features) if hidden is None else hidden
    head_dim = self.features // self.num_heads
    head = hidden.width(head_dim)
    dense = functools.partial(routing.SlicedDense, (self.features,),
                              (self.num_heads, head_dim), dtype=self.dtype)
    q = dense(name='query')(queries, head)
    k = dense(name='key')(inputs, head)
    v = dense(name='value')(inputs, head)
    q = q / jnp.sqrt(head_dim).astype(q.dtype)
    weights = jnp.einsum('...qhd,...khd->...hqk', q, k)
    weights = jnp.where(mask, weights, jnp.finfo(weights.dtype).min)
    weights = jax.nn.softmax(weights.astype(jnp.float32))
    if train and self.dropout > 0:
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1 - self.dropout, weights.shape)
      weights = weights * (keep.astype(q.dtype) / jnp.asarray(1 - self.dropout, q.dtype))
    y = jnp.einsum('...hqk,...khd->...qhd', weights, v)
    return routing.SlicedDense((self.num_heads, head_dim), (self.features,),
                               dtype=self.dtype, name='out')(y, hidden.width())


class TransformerLayer(nn.Module):
  """x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))) with a GELU FFN.

  Holds the attention and FFN weights (shared by schedule); the two LayerNorms
  are the caller's. `hidden` is the route's hidden-size choice (None: full);
  `last` computes the last position only (its attention sees every key the
  mask [B, 1, 1, L] allows), for a read-out at the last position.
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, norm_attn: routing.LayerNorm,
               norm_ffn: routing.LayerNorm, *, train: bool,
               hidden: routing.Choice | None = None, last: bool = False) -> jax.Array:
    s, dtype = self.spec, self.spec.compute_dtype
    hidden = routing.Choice.full(s.hidden_dim) if hidden is None else hidden
    width = hidden.width()
    dropout = nn.Dropout(s.dropout, deterministic=not train)
    h = norm_attn(x, width)
    queries = h[:, -1:] if last else h
    x = x[:, -1:] if last else x
    h = Attention(s.num_heads, s.hidden_dim, s.dropout, dtype, name='attn')(
        queries, h, mask, train=train, hidden=hidden)
    x = x + dropout(h)
    h = routing.SlicedDense((s.hidden_dim,), (s.ffn_dim,), dtype=dtype, name='ffn_in')(
        norm_ffn(x, width), hidden.width(s.ffn_dim))
    h = routing.SlicedDense((s.ffn_dim,), (s.hidden_dim,), dtype=dtype, name='ffn_out')(
        nn.gelu(h, approximate=False), width)
    return x + dropout(h)


class SASRec(nn.Module):
  """Embedded items [B, L, E] -> hidden states [B, L, hidden_dim]."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, *, train: bool,
               route: routing.Route | jax.Array | None = None) -> jax.Array:
    """Runs the layers; `valid` [B, L] marks the non-PAD inputs, L <= max_len.

    `route` (routing.choices): None, a static Route (hidden [B, L, H]) or
    route weights [B, R] (hidden [B, L, hidden_dim], zero beyond each row's H).
    """
    s, dtype = self.spec, self.spec.compute_dtype
    length = x.shape[1]
    if length > s.max_len:
      raise ValueError(f'sequence length {length} exceeds model.max_len {s.max_len}')
    dims = routing.choices(s, route)
    embed, hidden = dims.embed.width(), dims.hidden.width()
    x = embed(x[..., :embed.size].astype(dtype))
    if s.input_proj:
      x = routing.SlicedDense((s.embed_dim,), (s.hidden_dim,), use_bias=False, dtype=dtype,
                              name='input_proj')(x, hidden)
    positions = self.param('pos_embed', POSITION_INIT, (s.max_len, s.hidden_dim),
                           jnp.float32)
    x = hidden(x + positions[:length, :hidden.size].astype(dtype))
    x = nn.Dropout(s.dropout, deterministic=not train)(x)
    mask = attention_mask(valid)
    slots = sharing.layer_schedule(s.sharing, s.num_layers)
    layers = [TransformerLayer(s, name=f'layer_{j}')
              for j in range(sharing.num_sets(slots))]
    norm = functools.partial(routing.LayerNorm, s.hidden_dim, LN_EPSILON, dtype=dtype)
    for i, j in enumerate(slots[:dims.depth.blocks]):
      y = layers[j](x, mask, norm(name=f'norm_{i}_attn'), norm(name=f'norm_{i}_ffn'),
                    train=train, hidden=dims.hidden)
      x = routing.blend(dims.depth.gate(i), y, x)
    return norm(name='final_norm')(x, hidden)
