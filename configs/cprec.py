"""CpRec: NextItNet with block-wise adaptive embedding and softmax and
cross-block parameter sharing, on MovieLens-100K (leave-one-out, full ranking).

  python -m seqcompress_jax.main --config=configs/cprec.py --workdir=runs/cprec
  python -m seqcompress_jax.main --config=configs/cprec.py:block-softmax,adjacent-layer --workdir=...
  python -m seqcompress_jax.main --config=configs/cprec.py:sasrec --workdir=...

Presets (comma-separated, after the colon):
  blocks:   full (no blocks), block-input, block-softmax, both (default)
  sharing:  none, cross-layer, cross-block (default), adjacent-layer, adjacent-block
  backbone: nextitnet (default), sasrec (4 layers, so that blocks pair them)
  and the common ones: smoke, synthetic, bf16.
"""

import ml_collections

from seqcompress_jax.config import PRESETS, ConfigError, apply_presets, base_config
from seqcompress_jax.models.sharing import SCHEMES

BLOCKS = {
    'full': dict(embedding='full', head='full'),
    'block-input': dict(embedding='block', head='full'),
    'block-softmax': dict(embedding='full', head='adaptive'),
    'both': dict(embedding='block', head='adaptive'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config()
  config.model.update(backbone='nextitnet', dilations=(1, 4) * 4, dropout=0.3,
                      sharing='cross-block', **BLOCKS['both'])
  config.train.compression_report = True
  for name in filter(None, (arg or '').split(',')):
    if name in BLOCKS:
      config.model.update(**BLOCKS[name])
    elif name in SCHEMES:
      config.model.sharing = name
    elif name == 'nextitnet':
      config.model.backbone = 'nextitnet'
    elif name == 'sasrec':
      config.model.update(backbone='sasrec', num_layers=4, dropout=0.2)
    elif name in PRESETS:
      apply_presets(config, name)
    else:
      raise ConfigError(f'unknown preset {name!r}; expected some of '
                       f'{sorted([*BLOCKS, *SCHEMES, "nextitnet", "sasrec", *PRESETS])}')
  return config
