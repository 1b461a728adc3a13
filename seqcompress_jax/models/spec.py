"""ModelSpec: the static, hashable description of a model (CpRec blocks included)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from seqcompress_jax.config import ConfigError
from seqcompress_jax.models import blocks, sharing
from seqcompress_jax.models.sharing import SCHEMES

BACKBONES = ('nextitnet', 'sasrec')
EMBEDDINGS = ('full', 'block')
HEADS = ('full', 'sampled', 'adaptive')
SAMPLERS = ('log_uniform', 'uniform', 'popularity')
DTYPES = ('float32', 'bfloat16')
ROUTE_FIELDS = ('route_embed_dims', 'route_hidden_dims', 'route_depths')


def _is_positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Sizes and choices of a model; items are ids in [0, num_items), 0 = PAD.

  Validated on construction: a bad value raises ConfigError naming its
  `model.*` config field and the value expected.
  """
  num_items: int  # V, PAD included.
  backbone: str  # One of BACKBONES.
  embed_dim: int = 64
  hidden_dim: int = 64  # A bias-free projection follows the embedding if != embed_dim.
  max_len: int = 50
  # NextItNet: one residual block per entry r (convs with dilations r and 2r).
  dilations: tuple[int, ...] = (1, 4, 1, 4)
  kernel_size: int = 3
  # SASRec.
  num_layers: int = 2
  num_heads: int = 2
  ffn_dim: int = 256
  # Embedding dropout (both backbones); attention and residual dropout (SASRec).
  dropout: float = 0.2
  # NextItNet: dropout on each residual block's branch before it is added
  # (0 = the paper's block).
  block_dropout: float = 0.0
  # Layer-wise parameter sharing (both backbones), one of sharing.SCHEMES.
  sharing: str = 'none'
  # Input embedding, one of EMBEDDINGS: 'block' is CpRec's block-wise adaptive one.
  embedding: str = 'full'
  # CpRec blocks (block embedding, adaptive head): cutoffs c1 < ... < V of the
  # frequency-sorted ids, and one width per block (d, d / factor, ...).
  cutoffs: tuple[int, ...] = ()
  block_factor: int = 4
  block_widths: tuple[int, ...] = ()  # Resolved from block_factor when empty.
  # Output.
  head: str = 'full'  # One of HEADS; 'adaptive' is CpRec's block-wise softmax.
  # Adaptive head: per tail, the share of a batch's positions whose tail loss is
  # computed (blocks.AdaptiveSoftmax.capacity); () = every position.
  tail_capacity: tuple[float, ...] = ()
  # Adaptive head: tail items per step of its chunked passes (normaliser,
  # fast top-k). Small suits a CPU's cache; accelerators want ~1e5 (fewer steps).
  norm_chunk: int = blocks.AdaptiveSoftmax.norm_chunk
  tied: bool = False  # Output weight = the input embedding table.
  num_samples: int = 1024  # Sampled head: negatives per step.
  sampler: str = 'log_uniform'  # One of SAMPLERS.
  dtype: str = 'float32'  # Compute dtype, one of DTYPES; parameters are float32.
  # CANet routing space (routing.py): strictly increasing sizes whose largest
  # are embed_dim, hidden_dim and the depth (SASRec layers or NextItNet
  # blocks); all three empty = no routing.
  route_embed_dims: tuple[int, ...] = ()
  route_hidden_dims: tuple[int, ...] = ()
  route_depths: tuple[int, ...] = ()
  # The router (router.py): width, heads and FFN width of its one block.
  router_dim: int = 32
  router_heads: int = 4
  router_ffn_dim: int = 128
  # The item tables' item axes (sharding.ITEM_AXES: input embeddings, softmax
  # kernel and bias, block tails) are cut into this many equal parts, padded
  # at the end (heads.padded_size), so that mesh.model, a divisor of it, can
  # split them whatever V. Padded ids are never scored, ranked or returned.
  item_shards: int = 1

  def __post_init__(self):
    for name in ('dilations',) + ROUTE_FIELDS:
      if isinstance(getattr(self, name), (tuple, list)):
        object.__setattr__(self, name, tuple(getattr(self, name)))
    if not _is_positive_int(self.num_items) or self.num_items < 2:
      raise ValueError(f'num_items: expected an integer >= 2 (items + PAD), '
                       f'got {self.num_items!r}')
    sizes = ['embed_dim', 'hidden_dim', 'max_len', 'kernel_size', 'num_layers',
             'num_heads', 'ffn_dim', 'num_samples', 'router_dim', 'router_heads',
             'router_ffn_dim', 'item_shards', 'norm_chunk']
    checks = [(name, _is_positive_int(getattr(self, name)), 'a positive integer')
              for name in sizes]
    checks += [
        ('backbone', self.backbone in BACKBONES, f'one of {BACKBONES}'),
        ('head', self.head in HEADS, f'one of {HEADS}'),
        ('sampler', self.sampler in SAMPLERS, f'one of {SAMPLERS}'),
        ('dtype', self.dtype in DTYPES, f'one of {DTYPES}'),
        ('sharing', self.sharing in SCHEMES, f'one of {SCHEMES}'),
        ('dilations', isinstance(self.dilations, tuple) and bool(self.dilations)
         and all(map(_is_positive_int, self.dilations)),
         'a non-empty tuple or list of positive integers'),
        ('dropout', isinstance(self.dropout, (int, float))
         and 0 <= self.dropout < 1, 'a number in [0, 1)'),
        ('block_dropout', isinstance(self.block_dropout, (int, float))
         and 0 <= self.block_dropout < 1, 'a number in [0, 1)'),
        ('tied', isinstance(self.tied, bool), 'True or False'),
    ]
    for field, ok, expected in checks:
      if not ok:
        raise ConfigError(f'model.{field}: expected {expected}, '
                         f'got {getattr(self, field)!r}')
    if self.tied and self.hidden_dim != self.embed_dim:
      raise ConfigError(f'model.tied: expected False when hidden_dim '
                       f'({self.hidden_dim}) != embed_dim ({self.embed_dim})')
    if self.backbone == 'sasrec' and self.hidden_dim % self.num_heads:
      raise ConfigError(f'model.num_heads: expected a divisor of hidden_dim '
                        f'({self.hidden_dim}), got {self.num_heads!r}')
    if self.backbone == 'sasrec':
      sharing.layer_schedule(self.sharing, self.num_layers)  # Raises if odd.
    if self.tied and (self.embedding != 'full' or self.head == 'adaptive'):
      raise ConfigError('model.tied: expected False with a block embedding or '
                        'an adaptive head (block tables are never tied)')
    if any(getattr(self, name) for name in ROUTE_FIELDS):
      self._check_routing()
    if self.uses_blocks:
      try:
        cutoffs = blocks.check_cutoffs(self.cutoffs, self.num_items)
        widths = blocks.block_widths(self.embed_dim, len(cutoffs), self.block_factor,
                                     self.block_widths or None)
      except ValueError as e:
        raise ConfigError(f'model.cutoffs / model.block_widths: {e}') from e
      object.__setattr__(self, 'cutoffs', cutoffs)
      object.__setattr__(self, 'block_widths', widths)
    capacity = tuple(self.tail_capacity)
    object.__setattr__(self, 'tail_capacity', capacity)
    if capacity and (self.head != 'adaptive' or len(capacity) != len(self.cutoffs) - 1
                     or not all(isinstance(c, (int, float)) and 0 <= c <= 1
                                for c in capacity)):
      raise ConfigError(f'model.tail_capacity: expected () or, with the adaptive head, one '
                        f'share in [0, 1] per tail block, got {self.tail_capacity!r}')

  def _check_routing(self) -> None:
    largest = {'route_embed_dims': ('model.embed_dim', self.embed_dim),
               'route_hidden_dims': ('model.hidden_dim', self.hidden_dim),
               'route_depths': ('model.num_layers' if self.backbone == 'sasrec'
                                else 'len(model.dilations)', self.depth)}
    for name in ROUTE_FIELDS:
      sizes, (field, top) = getattr(self, name), largest[name]
      if not (isinstance(sizes, tuple) and sizes and all(map(_is_positive_int, sizes))
              and all(a < b for a, b in zip(sizes, sizes[1:])) and sizes[-1] == top):
        raise ConfigError(f'model.{name}: expected strictly increasing positive integers '
                          f'ending with {field} = {top} (all three route lists or none), '
                          f'got {sizes!r}')
    if self.backbone == 'sasrec' and any(
        h % self.num_heads or self.ffn_dim * h % self.hidden_dim
        for h in self.route_hidden_dims):
      raise ConfigError(f'model.route_hidden_dims: expected multiples of model.num_heads '
                        f'({self.num_heads}) whose share of model.hidden_dim divides '
                        f'model.ffn_dim ({self.ffn_dim}), got {self.route_hidden_dims!r}')
    if self.router_dim % self.router_heads:
      raise ConfigError(f'model.router_heads: expected a divisor of model.router_dim '
                        f'({self.router_dim}), got {self.router_heads!r}')

  @property
  def uses_blocks(self) -> bool:
    return self.embedding == 'block' or self.head == 'adaptive'

  @property
  def unpadded(self) -> ModelSpec:
    """The same model without padding (item_shards = 1): its parameters are
    the real ones, e.g. for counting them."""
    return dataclasses.replace(self, item_shards=1)

  @property
  def routed(self) -> bool:
    """Whether the model has a CANet routing space."""
    return bool(self.route_embed_dims)

  @property
  def depth(self) -> int:
    """Blocks of the backbone: SASRec layers or NextItNet residual blocks."""
    return self.num_layers if self.backbone == 'sasrec' else len(self.dilations)

  @property
  def input_proj(self) -> bool:
    """Whether a projection maps the embedding to the hidden size: when they
    differ, and always in a routed model (a route's E and H may differ)."""
    return self.routed or self.embed_dim != self.hidden_dim

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, num_items: int,
                  item_count: np.ndarray | None = None) -> ModelSpec:
    """Reads the `model` config section; absent fields take the defaults above.

    With CpRec blocks and no explicit `model.cutoffs`, the cutoffs are cut
    from the training counts `item_count` at the shares `model.cutoff_mass`.
    With the adaptive head, `model.capacity_factor` > 0 and `item_count`, tail
    j's loss capacity is capacity_factor times its share of the interactions.
    """
    if 'backbone' not in cfg:
      raise ConfigError(f'model.backbone: expected one of {BACKBONES}, got nothing')
    values = {f.name: cfg[f.name] for f in dataclasses.fields(cls)
              if f.name != 'num_items' and f.name in cfg}
    uses_blocks = (values.get('embedding') == 'block' or values.get('head') == 'adaptive')
    if uses_blocks and not values.get('cutoffs'):
      if item_count is None or 'cutoff_mass' not in cfg:
        raise ConfigError('model.cutoffs: give the cutoffs, or model.cutoff_mass '
                          'and the training counts to derive them from')
      try:
        values['cutoffs'] = blocks.cutoffs_from_mass(item_count, cfg.cutoff_mass)
      except ValueError as e:
        raise ConfigError(f'model.cutoff_mass: {e}') from e
    spec = cls(num_items=num_items, **values)
    factor = cfg.get('capacity_factor', 0)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 0:
      raise ConfigError(f'model.capacity_factor: expected a number >= 0 (0 = off), '
                        f'got {factor!r}')
    if spec.head == 'adaptive' and factor and item_count is not None:
      shares = blocks.tail_shares(item_count, spec.cutoffs)
      spec = dataclasses.replace(
          spec, tail_capacity=tuple(min(1.0, factor * share) for share in shares))
    return spec

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)
