"""The CANet router and routed inference (specs/canet.md).

  logits = Router(spec).apply({'params': router_params}, inputs)  # [B, R]
  weights = routing.straight_through(logits, rng)  # Training: masked path.
  routes = np.asarray(logits.argmax(-1))  # Evaluation: argmax.
  scores = RoutedInference(spec)(params, inputs, routes)  # Sliced sub-models.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqcompress_jax import buckets as buckets_lib
from seqcompress_jax.models import routing
from seqcompress_jax.models.model import Recommender, item_embedding
from seqcompress_jax.models.sasrec import LN_EPSILON, POSITION_INIT, TransformerLayer
from seqcompress_jax.models.spec import ModelSpec

OUTPUTS = ('logits', 'hidden')


def block_spec(spec: ModelSpec) -> ModelSpec:
  """The router's Transformer block as a SASRec spec: width router_dim,
  router_heads heads, FFN router_ffn_dim, no dropout."""
  return ModelSpec(num_items=spec.num_items, backbone='sasrec', embed_dim=spec.router_dim,
                   hidden_dim=spec.router_dim, max_len=spec.max_len, num_layers=1,
                   num_heads=spec.router_heads, ffn_dim=spec.router_ffn_dim, dropout=0.0,
                   dtype=spec.dtype)


class Router(nn.Module):
  """Item sequences [B, L] (left-padded, 0 = PAD) -> route logits [B, R].

  Its own item embedding (router_dim) plus learned positions, one
  bidirectional pre-LN Transformer block (sasrec.TransformerLayer) whose
  attention skips PAD keys, and a linear read-out at the last position. Only
  the last position is computed: with one block it is the only one the
  read-out needs. No dropout.
  """
  spec: ModelSpec

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    s, block = self.spec, block_spec(self.spec)
    dtype = s.compute_dtype
    length = inputs.shape[1]
    x = item_embedding(s, s.router_dim, name='embed')(inputs)
    positions = self.param('pos_embed', POSITION_INIT, (s.max_len, s.router_dim),
                           jnp.float32)
    x = x + positions[:length].astype(dtype)
    # Keys: the items, and the last position (a query always sees itself).
    mask = (jnp.asarray(inputs) != 0).at[:, -1].set(True)[:, None, None, :]
    norm = functools.partial(routing.LayerNorm, s.router_dim, LN_EPSILON, dtype=dtype)
    x = TransformerLayer(block, name='layer')(
        x, mask, norm(name='norm_attn'), norm(name='norm_ffn'), train=False, last=True)
    x = norm(name='final_norm')(x[:, 0])
    num_routes = routing.RoutingSpace.of(s).num_routes
    return nn.Dense(num_routes, dtype=dtype, name='logits')(x).astype(jnp.float32)


def init(spec: ModelSpec, rng: jax.Array) -> dict:
  """The router's 'params' collection."""
  return Router(spec).init(rng, jnp.zeros((1, 1), jnp.int32))['params']


def router_macs(spec: ModelSpec) -> int:
  """MACs of the router for one sequence of max_len positions (profiling.macs's
  conventions): keys and values at every position, the rest at the last."""
  length, d, ffn = spec.max_len, spec.router_dim, spec.router_ffn_dim
  keys_values = 2 * length * d * d
  attention = 2 * d * d + 2 * length * d  # Query and output projections; scores and sum.
  return keys_values + attention + 2 * d * ffn + d * routing.RoutingSpace.of(spec).num_routes


class RoutedInference:
  """Routed inference that saves real time: each route's rows run through
  that route's truly sliced sub-model.

  A batch is grouped by route on the host; a group is padded (PAD rows) to
  the smallest bucket that holds it, or split into chunks of the largest
  bucket, and runs through the sub-model compiled for that (route, bucket)
  (compiled once, cached). The results are scattered back into batch order
  on the device. Output 'logits': float32 [B, V] at the last position (the
  sliced head); 'hidden': the last hidden state [B, hidden_dim], zero beyond
  each row's H, as the masked path gives. `compiler_options` go to jax.jit.
  """

  def __init__(self, spec: ModelSpec, output: str = 'logits',
               buckets: Sequence[int] = tuple(2 ** i for i in range(3, 11)),
               compiler_options: dict | None = None):
    if output not in OUTPUTS:
      raise ValueError(f'output: expected one of {OUTPUTS}, got {output!r}')
    self.spec, self.output, self.buckets = spec, output, buckets_lib.check_buckets(buckets)
    self.compiler_options = compiler_options
    self.routes = routing.RoutingSpace.of(spec).routes
    self._compiled = {}

  @property
  def num_compiled(self) -> int:
    """The (route, bucket) programs compiled so far."""
    return len(self._compiled)

  def __call__(self, params: dict, inputs: np.ndarray, routes: np.ndarray) -> jax.Array:
    """params: the Recommender's; inputs [B, L] int32; routes [B] route
    indices (e.g. the router's argmax) -> [B, V] logits or [B, hidden_dim]."""
    inputs, routes = np.asarray(inputs), np.asarray(routes)
    width = self.spec.num_items if self.output == 'logits' else self.spec.hidden_dim
    out = jnp.zeros((len(inputs), width), jnp.float32)
    for route in np.unique(routes):
      for chunk, bucket in buckets_lib.chunks(np.flatnonzero(routes == route), self.buckets):
        padded = buckets_lib.pad_rows(inputs[chunk], bucket)
        values = self._program(int(route), params, padded)(params, padded)
        out = out.at[chunk].set(values[:len(chunk)])
    return out

  def _program(self, route: int, params: dict, padded: np.ndarray):
    key = (route, len(padded))
    if key not in self._compiled:
      run = functools.partial(self._run, self.routes[route])
      self._compiled[key] = jax.jit(run, compiler_options=self.compiler_options).lower(
          params, padded).compile()
    return self._compiled[key]

  def _run(self, route: routing.Route, params: dict, inputs: jax.Array) -> jax.Array:
    model = Recommender(self.spec)
    hidden = model.apply({'params': params}, inputs, train=False, route=route)[:, -1]
    if self.output == 'logits':
      return model.apply({'params': params}, hidden, method='logits')
    return jnp.pad(hidden.astype(jnp.float32),
                   ((0, 0), (0, self.spec.hidden_dim - route.hidden_dim)))
