"""CANet: a router picks, per user sequence, a weight-sliced sub-model (E, H, D)
of one SASRec-style Transformer, on MovieLens-100K (leave-one-out, full ranking).

  python -m seqcompress_jax.main --config=configs/canet.py --workdir=runs/canet
  python -m seqcompress_jax.main --config=configs/canet.py:nextitnet,cost-0.3 --workdir=...
  python -m seqcompress_jax.main --config=configs/canet.py:cprec --workdir=...

The backbone as the public code: E, H in {64, 96, 128}, D in {2, 4, 6, 8}
(36 routes), 4 heads, FFN 4H, dropout 0.2; max_len 50 (our data windows, the
public code uses 20). Loss: L_SR + 0.01 L_guide + 0.01 L_uni + cost_weight
E_route[MACs / MACs(full)].

Presets (comma-separated, after the colon; applied in the order listed here,
whatever their order in the argument):
  backbone:  sasrec (default), nextitnet (8 residual blocks, dilations (1, 4) x 4;
             depths count blocks)
  cprec:     CANet over CpRec: block embedding, adaptive softmax, cross-block sharing
  sharing:   none (default), cross-layer, cross-block, adjacent-layer, adjacent-block
  cpu:       a space sized for a few CPU cores: E, H in {32, 48, 64}, D in
             {1, 2, 3, 4} (36 routes, max 64 x 4 layers, 2 heads, FFN 4H);
             with nextitnet, 4 blocks (1, 4) x 2 and the same widths
  full:      the full model trained alone (no routing), for comparison
  cost-W:    canet.cost_weight = W (e.g. cost-0.3; default 0.1)
  and the common ones: smoke (tiny sizes and a small synthetic log: seconds),
  synthetic, bf16, sampled.
"""

import ml_collections

from seqcompress_jax.config import PRESETS, ConfigError, apply_presets, base_config
from seqcompress_jax.models.sharing import SCHEMES

DEFAULT_COST_WEIGHT = 0.1  # Untuned: see the canet-cost grid in configs/ablations.py.
BACKBONES = {
    'sasrec': dict(backbone='sasrec', num_layers=8, num_heads=4, ffn_dim=512, dropout=0.2),
    'nextitnet': dict(backbone='nextitnet', dilations=(1, 4) * 4, dropout=0.3),
}
ROUTES = dict(route_embed_dims=(64, 96, 128), route_hidden_dims=(64, 96, 128),
              route_depths=(2, 4, 6, 8))
NO_ROUTES = dict(route_embed_dims=(), route_hidden_dims=(), route_depths=())
CPREC = dict(embedding='block', head='adaptive', sharing='cross-block')
CPU_SASREC = dict(embed_dim=64, hidden_dim=64, num_layers=4, num_heads=2, ffn_dim=256,
                  route_embed_dims=(32, 48, 64), route_hidden_dims=(32, 48, 64),
                  route_depths=(1, 2, 3, 4))
CPU_NEXTITNET = dict(CPU_SASREC, dilations=(1, 4) * 2)
# Smoke: widths 16 and 32, depths 1 and 2 (8 routes), a small router.
SMOKE = dict(embed_dim=32, hidden_dim=32, num_layers=2, num_heads=2, ffn_dim=64,
             dilations=(1, 2), route_embed_dims=(16, 32), route_hidden_dims=(16, 32),
             route_depths=(1, 2), router_dim=16, router_heads=2, router_ffn_dim=32)


def _order(name: str) -> int:
  """Where a preset applies: backbone, cpu, CpRec, sharing, full, cost, common."""
  if name in BACKBONES:
    return 0
  for rank, group in enumerate((('cpu',), ('cprec',), SCHEMES, ('full',)), start=1):
    if name in group:
      return rank
  return 5 if name.startswith('cost-') else 6


def _cost_weight(name: str) -> float:
  try:
    weight = float(name[len('cost-'):])
  except ValueError:
    weight = -1.0
  if weight < 0:
    raise ConfigError(f'preset {name!r}: expected cost-W with a number W >= 0')
  return weight


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = base_config()
  config.model.update(embed_dim=128, hidden_dim=128, **BACKBONES['sasrec'], **ROUTES)
  config.canet.cost_weight = DEFAULT_COST_WEIGHT
  routed = True
  for name in sorted(filter(None, (arg or '').split(',')), key=_order):
    if name in BACKBONES:
      config.model.update(**BACKBONES[name])
    elif name == 'cpu':
      config.model.update(**(CPU_NEXTITNET if config.model.backbone == 'nextitnet'
                             else CPU_SASREC))
    elif name == 'cprec':
      config.model.update(**CPREC)
    elif name in SCHEMES:
      config.model.sharing = name
    elif name == 'full':
      config.model.update(**NO_ROUTES)
      routed = False
    elif name.startswith('cost-'):
      config.canet.cost_weight = _cost_weight(name)
    elif name == 'smoke':
      apply_presets(config, name)
      config.model.update(**SMOKE)
      if not routed:
        config.model.update(**NO_ROUTES)
    elif name in PRESETS:
      apply_presets(config, name)
    else:
      raise ConfigError(f'unknown preset {name!r}; expected some of '
                        f'{sorted([*BACKBONES, "cpu", "cprec", *SCHEMES, "full", *PRESETS])} '
                        'or cost-W')
  return config
