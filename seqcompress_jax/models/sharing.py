"""Layer-wise parameter sharing as a static schedule: layer slot -> parameter set.

A backbone of R blocks has 2R layer slots: slot 2i is layer a of block i and
slot 2i + 1 its layer b. The parameter tree stores one entry per set, numbered
in order of first use; each slot applies the set that the schedule names, so
the gradient of a shared set is the sum over its uses.
"""

from __future__ import annotations

from seqcompress_jax.config import ConfigError

SCHEMES = ('none', 'cross-layer', 'cross-block', 'adjacent-layer', 'adjacent-block')

# Slot s (block s // 2, layer s % 2) -> its parameter set, per scheme.
_SET_OF_SLOT = {
    'none': lambda s: s,  # 2R sets.
    'cross-layer': lambda s: 0,  # 1 set.
    'cross-block': lambda s: s % 2,  # 2 sets: every block reuses block 0's.
    'adjacent-layer': lambda s: s // 2,  # R sets: layers a and b of a block.
    # 2 ceil(R/2) sets: blocks 2m and 2m + 1 share layer a, and layer b.
    'adjacent-block': lambda s: 2 * (s // 4) + s % 2,
}


def schedule(scheme: str, num_blocks: int) -> tuple[int, ...]:
  """The parameter set of each of the 2 * num_blocks layer slots."""
  if scheme not in SCHEMES:
    raise ConfigError(f'model.sharing: expected one of {SCHEMES}, got {scheme!r}')
  return tuple(_SET_OF_SLOT[scheme](s) for s in range(2 * num_blocks))


def layer_schedule(scheme: str, num_layers: int) -> tuple[int, ...]:
  """The schedule of a stack of layers in which layers 2i, 2i + 1 form block i.

  An odd number of layers is allowed only when the scheme pairs no layers
  ('none', 'cross-layer').
  """
  slots = schedule(scheme, -(-num_layers // 2))
  if num_layers % 2 and scheme not in ('none', 'cross-layer'):
    raise ConfigError(f'model.num_layers: expected an even number with '
                     f'model.sharing={scheme!r}, got {num_layers}')
  return slots[:num_layers]


def num_sets(slots: tuple[int, ...]) -> int:
  """The number of parameter sets a schedule uses."""
  return len(set(slots))
