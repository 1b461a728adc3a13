"""Named grids of runs for launch/sweep.py.

A grid is a list of runs: (name, config file[:presets], {field: value} overrides).

  python launch/sweep.py --grid=cprec --root=runs/cprec-grid
"""

BLOCK_VARIANTS = ('full', 'block-input', 'block-softmax', 'both')
SCHEMES = ('none', 'cross-layer', 'cross-block', 'adjacent-layer', 'adjacent-block')


def _cprec(backbone: str) -> list[tuple[str, str, dict]]:
  return [(f'{backbone}-{blocks}-{scheme}', f'configs/cprec.py:{blocks},{scheme},{backbone}', {})
          for blocks in BLOCK_VARIANTS for scheme in SCHEMES]


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
    # Seconds-long runs on a small synthetic log (tests, a first try).
    'smoke': [(f'smoke-{blocks}-{scheme}', f'configs/cprec.py:{blocks},{scheme},smoke',
               {'train.max_steps': 4, 'train.compression_report': False})
              for blocks, scheme in (('full', 'none'), ('both', 'cross-block'))],
}
