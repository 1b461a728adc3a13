"""NextItNet: a stack of residual blocks of causal dilated convolutions.

ResBlock(x; r) = x + ReLU(LN_b(conv_b(ReLU(LN_a(conv_a(x; r))); 2r))), as in
the CpRec public code's block "b". The convs follow a sharing schedule
(model.sharing, see sharing.py): only the unique kernels are stored, at
`conv_{s}`, and block i applies sets schedule[2i] and schedule[2i + 1]. A
conv's dilation is a call argument, not part of its parameters, so one kernel
can serve several slots. LayerNorms are never shared: `block_{i}/norm_{a,b}`.

A CANet route (routing.py) keeps the first E embedding dims, the first H
channels of every conv (W[:, :H, :H]) and the first D blocks (identity after).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from seqcompress_jax.models import routing, sharing
from seqcompress_jax.models.spec import ModelSpec

CONV_INIT = nn.initializers.truncated_normal(stddev=0.02)
LN_EPSILON = 1e-8


class CausalConv(nn.Module):
  """1-D convolution over time whose output at t sees inputs t - (k-1)r .. t.

  The kernel is square, [k, features, features]: a narrower input uses its
  first input channels, and `width` (default: all) picks the output channels.
  """
  features: int
  kernel_size: int
  dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, dilation: int,
               width: routing.Width | None = None) -> jax.Array:
    """x: [B, L, C_in] -> [B, L, width.size], with dilation r (static)."""
    width = routing.Width(self.features) if width is None else width
    kernel = self.param('kernel', CONV_INIT,
                        (self.kernel_size, self.features, self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    kernel = kernel[:, :x.shape[-1], :width.size]
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias[:width.size], dtype=self.dtype)
    x = jnp.pad(x, ((0, 0), ((self.kernel_size - 1) * dilation, 0), (0, 0)))
    y = jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding='VALID', rhs_dilation=(dilation,),
        dimension_numbers=('NWC', 'WIO', 'NWC'))
    return width(y + bias)


class ResidualBlock(nn.Module):
  """Two causal convs (dilations r and 2r), each followed by LayerNorm and ReLU.

  The convs are the caller's (shared by schedule); the LayerNorms are the block's.
  """
  features: int
  dtype: DTypeLike = jnp.float32
  dropout: float = 0.0  # On the branch, before the residual sum.

  @nn.compact
  def __call__(self, x: jax.Array, conv_a: CausalConv, conv_b: CausalConv,
               dilation: int, width: routing.Width | None = None, *,
               train: bool = False) -> jax.Array:
    norm = functools.partial(routing.LayerNorm, self.features, LN_EPSILON, dtype=self.dtype)
    h = nn.relu(norm(name='norm_a')(conv_a(x, dilation, width), width))
    h = nn.relu(norm(name='norm_b')(conv_b(h, 2 * dilation, width), width))
    return x + nn.Dropout(self.dropout, deterministic=not train)(h)


class NextItNet(nn.Module):
  """Embedded items [B, L, E] -> hidden states [B, L, hidden_dim]."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, *, train: bool,
               route: routing.Route | jax.Array | None = None) -> jax.Array:
    """Runs the blocks; `valid` [B, L] marks the non-PAD inputs.

    PAD positions enter as zeros, like the causal convs' own left padding.
    Dropout: model.dropout on the embeddings, model.block_dropout on each
    residual branch. `route`
    (routing.choices): None, a static Route (hidden [B, L, H]) or route
    weights [B, R] (hidden [B, L, hidden_dim], zero beyond each row's H).
    """
    s = self.spec
    dims = routing.choices(s, route)
    embed, hidden = dims.embed.width(), dims.hidden.width()
    x = embed(jnp.where(valid[..., None], x[..., :embed.size], 0).astype(s.compute_dtype))
    x = nn.Dropout(s.dropout, deterministic=not train)(x)
    if s.input_proj:
      x = routing.SlicedDense((s.embed_dim,), (s.hidden_dim,), use_bias=False,
                              dtype=s.compute_dtype, name='input_proj')(x, hidden)
    slots = sharing.schedule(s.sharing, len(s.dilations))
    convs = [CausalConv(s.hidden_dim, s.kernel_size, s.compute_dtype, name=f'conv_{j}')
             for j in range(sharing.num_sets(slots))]
    for i, dilation in enumerate(s.dilations[:dims.depth.blocks]):
      y = ResidualBlock(s.hidden_dim, s.compute_dtype, s.block_dropout, name=f'block_{i}')(
          x, convs[slots[2 * i]], convs[slots[2 * i + 1]], dilation, hidden, train=train)
      x = routing.blend(dims.depth.gate(i), y, x)
    return x
