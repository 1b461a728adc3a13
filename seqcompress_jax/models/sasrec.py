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
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqcompress_jax.models import sharing
from seqcompress_jax.models.spec import ModelSpec

LN_EPSILON = 1e-8
POSITION_INIT = nn.initializers.normal(stddev=0.02)


def attention_mask(valid: jax.Array) -> jax.Array:
  """valid [B, L] (non-PAD) -> [B, 1, L, L]: key <= query, key valid or = query."""
  length = valid.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return (causal & (valid[:, None, :] | jnp.eye(length, dtype=bool)))[:, None]


class TransformerLayer(nn.Module):
  """x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))) with a GELU FFN.

  Holds the attention and FFN weights (shared by schedule); the two LayerNorms
  are the caller's.
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, norm_attn: nn.LayerNorm,
               norm_ffn: nn.LayerNorm, *, train: bool) -> jax.Array:
    s, dtype = self.spec, self.spec.compute_dtype
    dropout = nn.Dropout(s.dropout, deterministic=not train)
    h = nn.MultiHeadDotProductAttention(
        s.num_heads, dtype=dtype, qkv_features=s.hidden_dim,
        out_features=s.hidden_dim, broadcast_dropout=False,
        dropout_rate=s.dropout, deterministic=not train,
        force_fp32_for_softmax=True, name='attn')(norm_attn(x), mask=mask)
    x = x + dropout(h)
    h = nn.Dense(s.ffn_dim, dtype=dtype, name='ffn_in')(norm_ffn(x))
    h = nn.Dense(s.hidden_dim, dtype=dtype, name='ffn_out')(
        nn.gelu(h, approximate=False))
    return x + dropout(h)


class SASRec(nn.Module):
  """Embedded items [B, L, E] -> hidden states [B, L, hidden_dim]."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, *, train: bool) -> jax.Array:
    """Runs the layers; `valid` [B, L] marks the non-PAD inputs, L <= max_len."""
    s, dtype = self.spec, self.spec.compute_dtype
    length = x.shape[1]
    if length > s.max_len:
      raise ValueError(f'sequence length {length} exceeds model.max_len {s.max_len}')
    x = x.astype(dtype)
    if s.hidden_dim != s.embed_dim:
      x = nn.Dense(s.hidden_dim, use_bias=False, dtype=dtype, name='input_proj')(x)
    positions = self.param('pos_embed', POSITION_INIT, (s.max_len, s.hidden_dim),
                           jnp.float32)
    x = x + positions[:length].astype(dtype)
    x = nn.Dropout(s.dropout, deterministic=not train)(x)
    mask = attention_mask(valid)
    slots = sharing.layer_schedule(s.sharing, s.num_layers)
    layers = [TransformerLayer(s, name=f'layer_{j}')
              for j in range(sharing.num_sets(slots))]
    norm = functools.partial(nn.LayerNorm, LN_EPSILON, dtype=dtype)
    for i, j in enumerate(slots):
      x = layers[j](x, mask, norm(name=f'norm_{i}_attn'), norm(name=f'norm_{i}_ffn'),
                    train=train)
    return norm(name='final_norm')(x)
