"""NextItNet: a stack of residual blocks of causal dilated convolutions.

ResBlock(x; r) = x + ReLU(LN_b(conv_b(ReLU(LN_a(conv_a(x; r))); 2r))), as in
the CpRec public code's block "b". The convs follow a sharing schedule
(model.sharing, see sharing.py): only the unique kernels are stored, at
`conv_{s}`, and block i applies sets schedule[2i] and schedule[2i + 1]. A
conv's dilation is a call argument, not part of its parameters, so one kernel
can serve several slots. LayerNorms are never shared: `block_{i}/norm_{a,b}`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from seqcompress_jax.models import sharing
from seqcompress_jax.models.spec import ModelSpec

CONV_INIT = nn.initializers.truncated_normal(stddev=0.02)
LN_EPSILON = 1e-8


class CausalConv(nn.Module):
  """1-D convolution over time whose output at t sees inputs t - (k-1)r .. t."""
  features: int
  kernel_size: int
  dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, dilation: int) -> jax.Array:
    """x: [B, L, C_in] -> [B, L, features], with dilation r (static)."""
    kernel = self.param('kernel', CONV_INIT,
                        (self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    x = jnp.pad(x, ((0, 0), ((self.kernel_size - 1) * dilation, 0), (0, 0)))
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding='VALID', rhs_dilation=(dilation,),
        dimension_numbers=('NWC', 'WIO', 'NWC'))
    return y + bias


class ResidualBlock(nn.Module):
  """Two causal convs (dilations r and 2r), each followed by LayerNorm and ReLU.

  The convs are the caller's (shared by schedule); the LayerNorms are the block's.
  """
  dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, conv_a: CausalConv, conv_b: CausalConv,
               dilation: int) -> jax.Array:
    norm = functools.partial(nn.LayerNorm, LN_EPSILON, dtype=self.dtype)
    h = nn.relu(norm(name='norm_a')(conv_a(x, dilation)))
    h = nn.relu(norm(name='norm_b')(conv_b(h, 2 * dilation)))
    return x + h


class NextItNet(nn.Module):
  """Embedded items [B, L, E] -> hidden states [B, L, hidden_dim]."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, *, train: bool) -> jax.Array:
    """Runs the blocks; `valid` [B, L] marks the non-PAD inputs.

    PAD positions enter as zeros, like the causal convs' own left padding.
    Dropout (model.dropout) applies to the embeddings only.
    """
    s = self.spec
    x = jnp.where(valid[..., None], x, 0).astype(s.compute_dtype)
    x = nn.Dropout(s.dropout, deterministic=not train)(x)
    if s.hidden_dim != s.embed_dim:
      x = nn.Dense(s.hidden_dim, use_bias=False, dtype=s.compute_dtype,
                   name='input_proj')(x)
    slots = sharing.schedule(s.sharing, len(s.dilations))
    convs = [CausalConv(s.hidden_dim, s.kernel_size, s.compute_dtype, name=f'conv_{j}')
             for j in range(sharing.num_sets(slots))]
    for i, dilation in enumerate(s.dilations):
      x = ResidualBlock(s.compute_dtype, name=f'block_{i}')(
          x, convs[slots[2 * i]], convs[slots[2 * i + 1]], dilation)
    return x
