"""SASRec: a causal pre-LN Transformer over the item sequence.

The (projected) item embedding is added to a learned position embedding
without scaling by sqrt(embed_dim): both are initialised with stddev 0.02, so
neither dominates at the start, and every block normalises its input. Position
ids are 0..L-1 over the whole left-padded window.

Attention is causal and skips PAD keys; each query may always attend to
itself, so a PAD query whose earlier keys are all PAD has one visible key (no
NaN, no uniform attention over the future), and the model stays strictly causal.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqcompress_jax.models.spec import ModelSpec

LN_EPSILON = 1e-8
POSITION_INIT = nn.initializers.normal(stddev=0.02)


def attention_mask(valid: jax.Array) -> jax.Array:
  """valid [B, L] (non-PAD) -> [B, 1, L, L]: key <= query, key valid or = query."""
  length = valid.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  return (causal & (valid[:, None, :] | jnp.eye(length, dtype=bool)))[:, None]


class TransformerBlock(nn.Module):
  """x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))) with a GELU FFN."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    s, dtype = self.spec, self.spec.compute_dtype
    norm = functools.partial(nn.LayerNorm, LN_EPSILON, dtype=dtype)
    dropout = nn.Dropout(s.dropout, deterministic=not train)
    h = nn.MultiHeadDotProductAttention(
        s.num_heads, dtype=dtype, qkv_features=s.hidden_dim,
        out_features=s.hidden_dim, broadcast_dropout=False,
        dropout_rate=s.dropout, deterministic=not train,
        force_fp32_for_softmax=True, name='attn')(norm(name='norm_attn')(x),
                                                  mask=mask)
    x = x + dropout(h)
    h = nn.Dense(s.ffn_dim, dtype=dtype, name='ffn_in')(norm(name='norm_ffn')(x))
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
    for i in range(s.num_layers):
      x = TransformerBlock(s, name=f'layer_{i}')(x, mask, train=train)
    return nn.LayerNorm(LN_EPSILON, dtype=dtype, name='final_norm')(x)
