"""The base config every `configs/*.py` starts from, and its validation."""

from __future__ import annotations

import ml_collections

from seqcompress_jax.data.config import data_config

OPTIMIZERS = ('adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'exponential')
PROTOCOLS = ('full', 'sampled')
NEGATIVE_SAMPLERS = ('uniform', 'popularity')
ANNEALS = ('none', 'exponential')
COST_MACS = ('inference', 'middle')


class ConfigError(ValueError):
  """An invalid config value; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every method: data, model, optimiser, loop, evaluation."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = data_config()
  # 64 windows of max_len positions: ~3,200 targets per update. At 256 an ML-100K
  # epoch is only 9 updates and training needs ~3x the epochs (measured).
  c.data.batch_size = 64

  c.model = ml_collections.ConfigDict()
  c.model.backbone = 'nextitnet'  # 'nextitnet' | 'sasrec'
  c.model.embed_dim = 64
  c.model.hidden_dim = 64
  c.model.max_len = c.data.get_ref('max_len')  # Positions follow the data windows.
  c.model.dilations = (1, 4, 1, 4)  # NextItNet: one residual block per entry r.
  c.model.kernel_size = 3
  c.model.num_layers = 2  # SASRec.
  c.model.num_heads = 2
  c.model.ffn_dim = 256
  c.model.dropout = 0.0
  c.model.block_dropout = 0.0  # NextItNet: on each residual branch (0 = the paper's).
  # Layer-wise parameter sharing (CpRec): 'none' | 'cross-layer' | 'cross-block'
  # | 'adjacent-layer' | 'adjacent-block'.
  c.model.sharing = 'none'
  # CpRec blocks: 'block' embedding and/or 'adaptive' head. Cutoffs of the
  # frequency-sorted ids, or () to cut them where the most frequent items
  # cover these shares of the training interactions.
  c.model.embedding = 'full'  # 'full' | 'block'
  c.model.cutoffs = ()
  c.model.cutoff_mass = (0.5, 0.8)
  c.model.block_factor = 4  # Block j is d / factor^(j-1) wide ...
  c.model.block_widths = ()  # ... unless widths are given.
  c.model.head = 'full'  # 'full' | 'sampled' | 'adaptive'
  # Adaptive head: compute tail j's loss only for the positions whose target is
  # in it, in a buffer this many times the tail's share of the training
  # interactions (exact either way; 0 = every tail at every position).
  c.model.capacity_factor = 1.5
  # Adaptive head: tail items per step of its chunked normaliser and fast top-k
  # (8,192 suits a CPU; ~131,072 on GPU/TPU, where each step costs launches).
  c.model.norm_chunk = 8192
  c.model.tied = False
  c.model.num_samples = 1024  # Sampled softmax: negatives per batch.
  c.model.sampler = 'log_uniform'  # 'log_uniform' | 'uniform' | 'popularity'
  c.model.dtype = 'float32'  # Compute dtype: 'float32' | 'bfloat16'.
  # CANet routing space (configs/canet.py): strictly increasing sizes ending
  # with embed_dim, hidden_dim and the depth (SASRec layers or NextItNet
  # blocks); all three empty = no routing (the plain model).
  c.model.route_embed_dims = ()
  c.model.route_hidden_dims = ()
  c.model.route_depths = ()
  c.model.router_dim = 32  # The router's width, heads and FFN width.
  c.model.router_heads = 4
  c.model.router_ffn_dim = 128
  # The item tables are cut into this many equal parts (the last ones padded;
  # padded ids are never scored): mesh.model must divide it. Fixed per run,
  # so a checkpoint restores on any mesh.model that divides it.
  c.model.item_shards = 1

  # CANet's training objective (used when the model is routed): L_SR +
  # guide_weight * L_guide + uniform_weight * L_uni + cost_weight *
  # E_route[MACs(route) / MACs(full)] (specs/canet.md).
  c.canet = ml_collections.ConfigDict()
  c.canet.temperature = 1.0  # Gumbel-softmax temperature (shapes the gradients only).
  c.canet.anneal = 'none'  # 'none' | 'exponential': to final_temperature at the last step.
  c.canet.final_temperature = 0.5
  c.canet.guide_weight = 0.01
  c.canet.uniform_weight = 0.01
  c.canet.cost_weight = 0.0
  c.canet.cost_macs = 'inference'  # MACs of the cost term: 'inference' | 'middle' (backbone).
  c.canet.guide_k = 10  # A guide hit: the smallest sub-model ranks the target in its top k.
  c.canet.gumbel_at_test = False  # Evaluate with sampled (Gumbel) routes, not the argmax.

  c.optim = ml_collections.ConfigDict()
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 1e-3
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 0
  c.optim.decay_rate = 0.1  # exponential: factor reached at the last step.
  c.optim.weight_decay = 0.0  # adamw: decoupled; adam: L2 added to the loss.
  c.optim.grad_clip = 5.0  # Global norm; 0 = off.
  # > 0: evaluate, keep and export a moving average of the parameters with
  # this decay (step.average_params); 0 = the trained parameters themselves.
  c.optim.ema_decay = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 60
  c.train.max_steps = 0  # > 0 overrides num_epochs.
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 0  # 0 = once per epoch.
  c.train.patience = 10  # Evaluations without improvement before stopping.
  c.train.metric = 'NDCG@10'  # Validation metric for early stopping / best model.
  c.train.max_bad_steps = 10  # Consecutive non-finite steps before giving up.
  # Diagnostic only: also evaluate test at every evaluation, written to
  # metrics.jsonl as split 'test_trace'; never used for selection or stopping.
  c.train.trace_test = False
  # After training, measure against the uncompressed model of the same widths
  # (results.json 'compression'); on in configs/cprec.py.
  c.train.compression_report = False

  c.eval = ml_collections.ConfigDict()
  c.eval.ks = (5, 10, 20)
  c.eval.protocol = 'full'  # 'full' ranking | 'sampled' (100 negatives)
  c.eval.num_negatives = 100
  c.eval.negative_sampler = 'uniform'  # 'uniform' | 'popularity'
  c.eval.exclude_history = False  # Do not rank items of the user's history.
  c.eval.history_len = 0  # Items of history to exclude; 0 = max_len.
  c.eval.chunk_size = 4096  # Items scored at once in full ranking.

  # The device mesh (sharding.py): `data` splits the batches, `model` the item
  # axis of the item tables; -1 = the devices the other axis leaves.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.model = 1
  return c


def validate(config: ml_collections.ConfigDict, num_items: int | None = None) -> None:
  """Raises ConfigError naming the first invalid field (data.* are checked by
  the data package, model.* by ModelSpec)."""
  o, t, e, n = config.optim, config.train, config.eval, config.canet
  checks = [
      ('optim.optimizer', o.optimizer in OPTIMIZERS, f'one of {OPTIMIZERS}'),
      ('optim.schedule', o.schedule in SCHEDULES, f'one of {SCHEDULES}'),
      ('optim.learning_rate', o.learning_rate > 0, 'a number > 0'),
      ('optim.warmup_steps', o.warmup_steps >= 0, 'an integer >= 0'),
      ('optim.decay_rate', 0 < o.decay_rate <= 1, 'a factor in (0, 1]'),
      ('optim.weight_decay', o.weight_decay >= 0, 'a number >= 0'),
      ('optim.grad_clip', o.grad_clip >= 0, 'a number >= 0 (0 = off)'),
      ('optim.ema_decay', 0 <= o.ema_decay < 1, 'a decay in [0, 1) (0 = off)'),
      ('train.num_epochs', t.num_epochs >= 1 or t.max_steps > 0, 'an integer >= 1'),
      ('train.max_steps', t.max_steps >= 0, 'an integer >= 0'),
      ('train.log_every_steps', t.log_every_steps >= 1, 'an integer >= 1'),
      ('train.eval_every_steps', t.eval_every_steps >= 0, 'an integer >= 0'),
      ('train.patience', t.patience >= 1, 'an integer >= 1'),
      ('eval.protocol', e.protocol in PROTOCOLS, f'one of {PROTOCOLS}'),
      ('eval.negative_sampler', e.negative_sampler in NEGATIVE_SAMPLERS,
       f'one of {NEGATIVE_SAMPLERS}'),
      ('eval.chunk_size', e.chunk_size >= 1, 'an integer >= 1'),
      ('eval.history_len', e.history_len >= 0, 'an integer >= 0'),
      ('eval.ks', isinstance(e.ks, (tuple, list)) and len(e.ks) > 0
       and all(isinstance(k, int) and k >= 1 for k in e.ks),
       'a non-empty list of integers >= 1'),
      ('canet.temperature', _is_number(n.temperature) and n.temperature > 0, 'a number > 0'),
      ('canet.anneal', n.anneal in ANNEALS, f'one of {ANNEALS}'),
      ('canet.final_temperature', _is_number(n.final_temperature) and _is_number(n.temperature)
       and 0 < n.final_temperature <= n.temperature, 'a number in (0, canet.temperature]'),
      ('canet.guide_weight', _is_number(n.guide_weight) and n.guide_weight >= 0,
       'a number >= 0'),
      ('canet.uniform_weight', _is_number(n.uniform_weight) and n.uniform_weight >= 0,
       'a number >= 0'),
      ('canet.cost_weight', _is_number(n.cost_weight) and n.cost_weight >= 0, 'a number >= 0'),
      ('canet.cost_macs', n.cost_macs in COST_MACS, f'one of {COST_MACS}'),
      ('canet.guide_k', isinstance(n.guide_k, int) and not isinstance(n.guide_k, bool)
       and n.guide_k >= 1, 'an integer >= 1'),
      ('canet.gumbel_at_test', isinstance(n.gumbel_at_test, bool), 'True or False'),
  ]
  metric_names = {f'{m}@{k}' for m in ('HR', 'NDCG', 'MRR') for k in e.ks} | {'MRR'}
  checks.append(('train.metric', t.metric in metric_names,
                 f'one of {sorted(metric_names)} (from eval.ks)'))
  if num_items is not None:
    competitors = num_items - 1 if e.protocol == 'full' else e.num_negatives + 1
    checks.append(('eval.ks', max(e.ks) <= competitors,
                   f'cut-offs <= the {competitors} ranked candidates'))
    checks.append(('canet.guide_k', n.guide_k <= num_items - 1,
                   f'at most the {num_items - 1} items'))
    if e.protocol == 'sampled':
      checks.append(('eval.num_negatives', 1 <= e.num_negatives <= num_items - 2,
                     f'between 1 and {num_items - 2} (the items other than the target)'))
  for field, ok, expected in checks:
    if not ok:
      section, name = field.split('.')
      raise ConfigError(f'{field}: expected {expected}, got {config[section][name]!r}')


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_overrides(argv: list[str], flag: str, config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a `--FLAG.a.b=v` in argv where `config` has no a.b."""
  prefix = f'--{flag}.'
  for arg in argv:
    if not arg.startswith(prefix):
      continue
    path = arg[len(prefix):].split('=', 1)[0].split('.')
    node = config
    for depth, key in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        parent = '.'.join([flag] + path[:depth])
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f'{prefix}{".".join(path)}: {parent} has no field {key!r} '
                          f'(fields: {", ".join(fields)})')
      node = node[key]


def _smoke(c: ml_collections.ConfigDict) -> None:
  c.data.name = 'synthetic'
  c.data.synthetic.update(num_users=400, num_items=300, mean_len=20.0, max_len=60)
  c.data.max_len = 20
  c.data.batch_size = 64
  c.data.eval_batch_size = 128
  c.model.update(embed_dim=32, hidden_dim=32, ffn_dim=64)
  c.train.update(num_epochs=2, log_every_steps=5)


def _synthetic(c: ml_collections.ConfigDict) -> None:
  c.data.name = 'synthetic'
  c.data.synthetic.update(num_users=20000, num_items=10000, mean_len=30.0)


def _pod(c: ml_collections.ConfigDict) -> None:
  """A multi-host run (launch/tpu_pod.sh, launch/slurm_gpu.sh): every device
  of a TPU v4-32 (16 chips on 4 hosts) or of 8 GPUs on `data`, global
  batches of 1,024 windows (64 per chip, 128 per GPU; any power of two up to
  1,024 devices divides them), bfloat16 compute. Splitting the item tables
  too is --config.mesh.model=K with --config.model.item_shards a multiple of K."""
  c.mesh.update(data=-1, model=1)
  c.data.update(batch_size=1024, eval_batch_size=1024)
  c.model.dtype = 'bfloat16'


PRESETS = {
    'smoke': _smoke,
    'synthetic': _synthetic,
    'pod': _pod,
    'bf16': lambda c: c.model.update(dtype='bfloat16'),
    'sampled': lambda c: c.model.update(head='sampled'),
}


def apply_presets(config: ml_collections.ConfigDict, arg: str | None
                  ) -> ml_collections.ConfigDict:
  """Applies comma-separated preset names (`--config=FILE:smoke,bf16`)."""
  for name in filter(None, (arg or '').split(',')):
    if name not in PRESETS:
      raise ConfigError(f'unknown preset {name!r}; expected some of {sorted(PRESETS)}')
    PRESETS[name](config)
  return config
