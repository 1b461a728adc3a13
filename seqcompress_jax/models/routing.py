"""CANet routing: the route space, weight slicing, the straight-through route
choice, the router's losses and the MACs of every route (specs/canet.md).

A route (E, H, D) is a sub-model of one max-size network: the first E
embedding dims, the first H hidden channels (and, in SASRec, the first H /
heads dims of every head and the first ffn_dim * H / H_max FFN units), and
the first D blocks. A backbone computes a route on one of two paths, the same
function up to rounding:

- sliced (a static `Route`): parameters are truly sliced, so the compute
  shrinks; hidden states come out [..., H];
- masked (route weights [B, R], one-hot rows from `straight_through`): every
  tensor keeps its max width, channel masks sum_o c[o] * mask_o and depth
  gates come from the per-dimension selectors c = weights @ members, so the
  router gets gradients; hidden states come out [..., H_max], zero beyond H.

Layers take a `Width` (a size, and in the masked path a per-row mask) per
sliced axis; `choices(spec, route)` gives one `Choice` per routed dimension,
from which they derive the widths they need. No route is the full model.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from seqcompress_jax.models.spec import ModelSpec

# The m of the guide loss's geometric targets for E, H and D.
GUIDE_POWERS = (2.0, 2.0, 1.0)


class Route(NamedTuple):
  """One sub-model: embedding size, hidden size and depth (blocks or layers)."""
  embed_dim: int
  hidden_dim: int
  depth: int


@dataclasses.dataclass(frozen=True)
class RoutingSpace:
  """The routes E x H x D, ordered hidden -> depth -> embedding as the public
  code (E varies fastest): route 0 is the smallest, the last the full model."""
  embed_dims: tuple[int, ...]
  hidden_dims: tuple[int, ...]
  depths: tuple[int, ...]

  @classmethod
  def of(cls, spec: ModelSpec) -> RoutingSpace:
    if not spec.routed:
      raise ValueError('model.route_embed_dims: the model has no routing space')
    return cls(spec.route_embed_dims, spec.route_hidden_dims, spec.route_depths)

  @property
  def dims(self) -> tuple[tuple[int, ...], ...]:
    """The options of each dimension, in Route's order (E, H, D)."""
    return self.embed_dims, self.hidden_dims, self.depths

  @property
  def routes(self) -> tuple[Route, ...]:
    return tuple(Route(e, h, d) for h, d, e in
                 itertools.product(self.hidden_dims, self.depths, self.embed_dims))

  @property
  def num_routes(self) -> int:
    return len(self.embed_dims) * len(self.hidden_dims) * len(self.depths)

  def members(self) -> tuple[np.ndarray, ...]:
    """Per dimension (E, H, D), float32 [R, options]: 1 where route r uses option o."""
    routes = np.array(self.routes)
    return tuple((routes[:, i, None] == np.array(options)).astype(np.float32)
                 for i, options in enumerate(self.dims))

  def selectors(self, weights: jax.Array) -> tuple[jax.Array, ...]:
    """Route weights [..., R] -> (c_E, c_H, c_D), each [..., options]: c[o] is
    the sum of the weights of the routes that use option o."""
    return tuple(weights @ members for members in self.members())


def prefix(array: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The leading block array[:shape[0], :shape[1], ...]."""
  return array[tuple(slice(0, n) for n in shape)]


@dataclasses.dataclass(frozen=True)
class Width:
  """The live channels of a feature axis: the first `size` (sliced path, or no
  route), or all `size` with a per-row 0/1 `mask` [B, size] (masked path)."""
  size: int
  mask: jax.Array | None = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, ..., size] with the masked-out channels zeroed."""
    return x if self.mask is None else x * self.broadcast(x).astype(x.dtype)

  def broadcast(self, x: jax.Array) -> jax.Array:
    """The mask reshaped to broadcast against x [B, ..., size]."""
    return self.mask.reshape(self.mask.shape[:1] + (1,) * (x.ndim - 2) + self.mask.shape[1:])


@dataclasses.dataclass(frozen=True)
class Choice:
  """One routed dimension as a layer sees it: the option sizes (one option: a
  static sub-model or the full model) and, in the masked path, the per-row
  selector [B, options] over them; `largest` is the full model's size."""
  sizes: tuple[int, ...]
  largest: int
  selector: jax.Array | None = None

  @classmethod
  def full(cls, size: int) -> Choice:
    return cls((size,), size)

  def width(self, full: int | None = None) -> Width:
    """The channels of an axis of `full` (default: largest) channels that
    scales with this dimension: the first full * size / largest."""
    full = self.largest if full is None else full
    sizes = [size * full // self.largest for size in self.sizes]
    if self.selector is None:
      return Width(sizes[0])
    table = (np.arange(full) < np.array(sizes)[:, None]).astype(np.float32)
    return Width(full, self.selector @ table)

  @property
  def blocks(self) -> int:
    """The blocks to run: the largest option (masked blocks are gated)."""
    return max(self.sizes)

  def gate(self, block: int) -> jax.Array | None:
    """[B] 1 where `block` runs in the row's route, else 0; None when it runs
    in every option (no gate needed)."""
    if all(block < size for size in self.sizes):
      return None
    return self.selector @ (block < np.array(self.sizes)).astype(np.float32)


class Choices(NamedTuple):
  embed: Choice
  hidden: Choice
  depth: Choice


def choices(spec: ModelSpec, route: Route | jax.Array | None) -> Choices:
  """What a backbone of `spec` runs: the full model (route None), a static
  sub-model (a Route of the space) or, for route weights [B, R], every route
  masked per row."""
  largest = (spec.embed_dim, spec.hidden_dim, spec.depth)
  if route is None:
    return Choices(*map(Choice.full, largest))
  space = RoutingSpace.of(spec)
  if isinstance(route, Route):
    if route not in space.routes:
      raise ValueError(f'route {route} is not in the routing space {space}')
    return Choices(*(Choice((size,), top) for size, top in zip(route, largest)))
  if route.shape[-1] != space.num_routes:
    raise ValueError(f'route weights: expected [B, {space.num_routes}], got {route.shape}')
  return Choices(*(Choice(options, top, selector) for options, top, selector in
                   zip(space.dims, largest, space.selectors(route))))


def blend(gate: jax.Array | None, new: jax.Array, old: jax.Array) -> jax.Array:
  """gate * new + (1 - gate) * old per row (exactly `new` or `old` for a 0/1
  gate); `new` when gate is None."""
  if gate is None:
    return new
  g = gate.reshape(gate.shape + (1,) * (new.ndim - 1)).astype(new.dtype)
  return g * new + (1 - g) * old


class LayerNorm(nn.Module):
  """flax's LayerNorm (fast variance, float32 statistics, `scale` and `bias`
  [features]) over the live channels of `width`: a narrower input uses the
  leading scale and bias; a masked width takes the statistics over the
  unmasked channels and zeroes the others."""
  features: int
  epsilon: float = 1e-6
  dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, width: Width | None = None) -> jax.Array:
    width = Width(x.shape[-1]) if width is None else width
    size = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (self.features,), jnp.float32)[:size]
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)[:size]
    where = None if width.mask is None else width.broadcast(x) != 0
    stats = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = stats.mean(-1, where=where, keepdims=True)
    var = jnp.maximum(0.0, jnp.square(stats).mean(-1, where=where, keepdims=True)
                      - jnp.square(mean))
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return width(y.astype(self.dtype))


def _flat_init(init: Callable, num_in: int) -> Callable:
  """`init` over the kernel flattened to [prod(in), prod(out)], as flax's DenseGeneral."""
  def wrapped(rng, shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:num_in])), int(np.prod(shape[num_in:])))
    return init(rng, flat, dtype).reshape(shape)
  return wrapped


class SlicedDense(nn.Module):
  """x @ W + b over x's last len(in_shape) axes, with flax Dense / DenseGeneral
  parameters (`kernel` in_shape + out_shape, `bias` out_shape) and init.

  A narrower input uses the kernel's leading input block; the last output
  axis has the channels of `width` (default: all of them).
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  use_bias: bool = True
  dtype: DTypeLike = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, width: Width | None = None) -> jax.Array:
    num_in = len(self.in_shape)
    kernel = self.param('kernel', _flat_init(nn.initializers.lecun_normal(), num_in),
                        self.in_shape + self.out_shape, jnp.float32)
    out_shape = self.out_shape[:-1] + (self.out_shape[-1] if width is None else width.size,)
    kernel = prefix(kernel, x.shape[x.ndim - num_in:] + out_shape)
    bias = (prefix(self.param('bias', nn.initializers.zeros, self.out_shape, jnp.float32),
                   out_shape) if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - num_in, x.ndim)),
                                         tuple(range(num_in))), ((), ())))
    if bias is not None:
      y += bias
    return y if width is None else width(y)


# ---------------------------------------------------------------- route choice


def straight_through(logits: jax.Array, rng: jax.Array | None = None,
                     temperature: float = 1.0) -> jax.Array:
  """Straight-through Gumbel-softmax route weights [..., R] from router logits.

  y_soft = softmax((log_softmax(logits) + g) / temperature), g ~ Gumbel(0, 1)
  (g = 0 when rng is None: argmax routing); the forward value is exactly
  one_hot(argmax y_soft), the gradient that of y_soft.
  """
  scores = jax.nn.log_softmax(logits.astype(jnp.float32))
  if rng is not None:
    scores += jax.random.gumbel(rng, scores.shape)
  soft = jax.nn.softmax(scores / temperature)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1])
  return hard + (soft - jax.lax.stop_gradient(soft))  # soft - soft = 0 exactly.


def guide_targets(num_options: int, power: float) -> np.ndarray:
  """float64 [2, n]: the guide loss's soft targets over n options, ascending.

  Row 1 (a miss: prefer large) is w_i proportional to (2^i / 2^n)^power;
  row 0 (a hit: prefer small) is the same reversed.
  """
  weights = (2.0 ** np.arange(num_options) / 2.0 ** num_options) ** power
  weights /= weights.sum()
  return np.stack([weights[::-1], weights])


def guide_loss(space: RoutingSpace, logits: jax.Array, hit: jax.Array) -> jax.Array:
  """Mean over rows of sum over E, H, D of the soft CE between the router's
  marginal over that dimension's options and the guide targets.

  Args:
    space: the routing space.
    logits: router logits [B, R].
    hit: bool [B], True where the smallest sub-model ranks the row's target
      in its top 10 (computed without gradients); such rows are guided to
      small options, the others to large ones.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  total = jnp.zeros((), jnp.float32)
  for members, power in zip(space.members(), GUIDE_POWERS):
    # log of the marginal sum_{r uses o} p_r, stable where the marginal is tiny.
    log_marginal = jax.nn.logsumexp(
        jnp.where(members.T > 0, log_probs[..., None, :], -jnp.inf), axis=-1)
    table = guide_targets(members.shape[1], power).astype(np.float32)
    targets = jnp.where(hit[:, None], table[0], table[1])
    total += -(targets * log_marginal).sum(-1).mean()
  return total


def uniform_loss(logits: jax.Array) -> jax.Array:
  """Soft CE between the router distribution [B, R] and uniform, mean over rows."""
  return -jax.nn.log_softmax(logits.astype(jnp.float32)).mean()


def expected_cost(logits: jax.Array, costs: np.ndarray) -> jax.Array:
  """E_route[cost] under the router distribution, mean over rows; `costs` [R]
  as from relative_costs."""
  return (jax.nn.softmax(logits.astype(jnp.float32)) @ jnp.asarray(costs, jnp.float32)).mean()


# ---------------------------------------------------------------- MACs


def route_macs(spec: ModelSpec, route: Route) -> dict[str, int]:
  """Multiply-accumulates of the sliced sub-model `route` (the full model for
  (embed_dim, hidden_dim, depth)) for one sequence of max_len positions.

  'embedding' is the block embedding's tail projections (every tail for every
  position: the static-shape implementation computes them all; 0 for a plain
  table); 'middle' the backbone (input projection included); 'output' the
  head for one position (the adaptive head with every tail evaluated).
  'inference' = embedding + middle + output at the last position (next-item
  prediction); 'train_forward' puts the output at every position.

  The Transformer's middle is L E H + D (4 L H^2 + 2 L^2 H + 2 L H F) with F
  = ffn_dim * H / H_max (= the spec's 8 L H^2 for ffn_dim = 4 H_max);
  NextItNet's is L E H + 2 D L k H^2.
  """
  length, v = spec.max_len, spec.num_items
  e, h, depth = route
  embedding = length * e * sum(spec.block_widths[1:]) if spec.embedding == 'block' else 0
  middle = length * e * h if spec.input_proj else 0
  if spec.backbone == 'nextitnet':
    middle += 2 * depth * length * spec.kernel_size * h * h
  else:
    ffn = spec.ffn_dim * h // spec.hidden_dim
    middle += depth * (4 * length * h * h + 2 * length * length * h + 2 * length * h * ffn)
  if spec.head == 'adaptive':
    sizes = [b - a for a, b in zip(spec.cutoffs, spec.cutoffs[1:])]
    output = h * (spec.cutoffs[0] + len(sizes)) + sum(
        d * (h + size) for d, size in zip(spec.block_widths[1:], sizes))
  else:
    output = h * v
  return {'embedding': embedding, 'middle': middle, 'output': output,
          'inference': embedding + middle + output,
          'train_forward': embedding + middle + length * output}


def relative_costs(spec: ModelSpec, key: str = 'inference') -> np.ndarray:
  """float64 [R]: route_macs(route)[key] / route_macs(full)[key] per route;
  key 'inference' counts the output layer, 'middle' the backbone only."""
  macs = np.array([route_macs(spec, r)[key] for r in RoutingSpace.of(spec).routes], float)
  return macs / macs[-1]
