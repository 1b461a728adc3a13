"""Named grids of runs for launch/sweep.py.

A grid is a list of runs: (name, config file[:presets], {field: value} overrides).

  python launch/sweep.py --grid=cprec --root=runs/cprec-grid
"""

BLOCK_VARIANTS = ('full', 'block-input', 'block-softmax', 'both')
SCHEMES = ('none', 'cross-layer', 'cross-block', 'adjacent-layer', 'adjacent-block')


def _cprec(backbone: str) -> list[tuple[str, str, dict]]:
  return [(f'{backbone}-{blocks}-{scheme}', f'configs/cprec.py:{blocks},{scheme},{backbone}', {})
          for blocks in BLOCK_VARIANTS for scheme in SCHEMES]


COST_WEIGHTS = (0.0, 0.03, 0.1, 0.3, 1.0)


def _canet_cost(presets: str = '') -> list[tuple[str, str, dict]]:
  """CANet at a few cost weights, after the full model trained alone: the
  trade-off curve of test NDCG@10 against the average routed MACs."""
  prefix = f'{presets},' if presets else ''
  name = f'-{presets}' if presets else ''
  return ([(f'full{name}', f'configs/canet.py:{prefix}full', {})]
          + [(f'canet{name}-cost-{w:g}', f'configs/canet.py:{prefix}cost-{w:g}', {})
             for w in COST_WEIGHTS])


GRIDS = {
    # CpRec's ablation on ML-100K: every block variant x sharing scheme (20 runs).
    'cprec': _cprec('nextitnet'),
    'cprec-sasrec': _cprec('sasrec'),
    # CpRec's default against the uncompressed model of the same widths.
    'cprec-headline': [('nextitnet-full-none', 'configs/cprec.py:full,none', {}),
                       ('nextitnet-both-cross-block', 'configs/cprec.py:both,cross-block', {})],
    # The uncompressed backbones.
    'backbones': [('nextitnet', 'configs/nextitnet.py', {}),
                  ('sasrec', 'configs/sasrec.py', {})],
    # CANet's trade-off curve (SASRec, as the public code; NextItNet; over CpRec).
    'canet-cost': _canet_cost(),
    'canet-cost-nextitnet': _canet_cost('nextitnet'),
    'canet-cost-cprec': _canet_cost('cprec'),
    # The same on configs/canet.py's CPU-sized space (64 x 4 layers at most).
    'canet-cost-cpu': _canet_cost('cpu'),
    'canet-cost-cpu-nextitnet': _canet_cost('nextitnet,cpu'),
    # Seconds-long runs on a small synthetic log (tests, a first try).
    'smoke': [(f'smoke-{blocks}-{scheme}', f'configs/cprec.py:{blocks},{scheme},smoke',
               {'train.max_steps': 4, 'train.compression_report': False})
              for blocks, scheme in (('full', 'none'), ('both', 'cross-block'))],
}
