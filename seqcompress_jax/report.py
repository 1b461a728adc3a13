"""Compares finished runs: one table of runs and, where matplotlib is installed,
plots of test NDCG@10 against parameters and MACs and of the training curves.

  python -m seqcompress_jax.report runs/nextitnet runs/cprec-grid --out=/tmp/report

Each argument is a run's workdir (it holds config.json and results.json), a
folder of runs (a sweep root: its subfolders are taken) or a glob of either.
Folders without results.json (unfinished or failed runs) are skipped with a
warning. Prints the Markdown table; with --out writes DIR/table.md,
DIR/table.csv, DIR/ndcg_vs_params.png, DIR/ndcg_vs_macs.png and
DIR/training_curves.png.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from typing import Any, Callable, Sequence

import ml_collections
from absl import app, flags

from seqcompress_jax import compression, rundir
from seqcompress_jax.config import ConfigError
from seqcompress_jax.data import DataError, load_dataset
from seqcompress_jax.files import atomic_write
from seqcompress_jax.models.spec import ModelSpec

COLUMNS = ('run', 'method', 'params', 'compression', 'MACs/seq', 'routed MACs/seq',
           'routed MACs %', 'train seq/s', 'valid NDCG@10', 'test NDCG@10', 'test HR@10',
           'train s', 'step speed-up', 'ranking speed-up')
BACKBONES = {'nextitnet': 'NextItNet', 'sasrec': 'SASRec'}
PLOTS = ('ndcg_vs_params.png', 'ndcg_vs_macs.png', 'training_curves.png')


def warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr)


# ------------------------------------------------------------ finding runs ---
def find_runs(paths: Sequence[str]) -> list[str]:
  """The run folders named by `paths` (runs, folders of runs, globs), in the
  order given, folders of runs expanded to their sorted subfolders. Folders
  without results.json or config.json are skipped with a warning; raises
  FileNotFoundError when none is left."""
  runs = []
  for path in paths:
    matches = sorted(glob.glob(path)) if glob.escape(path) != path else [path]
    if not matches:
      warn(f'{path}: matches nothing, skipped')
    for match in matches:
      if not os.path.exists(match):
        warn(f'{match}: does not exist, skipped')
      elif not os.path.isdir(match):
        warn(f'{match}: not a folder, skipped')
      elif _is_run(match):
        runs.append(match)
      else:
        subfolders = sorted(e.path for e in os.scandir(match) if e.is_dir())
        if not subfolders:
          warn(f'{match}: no results.json and no subfolders, skipped')
        runs += subfolders
  usable = []
  for run in runs:
    missing = [f for f in ('results.json', 'config.json')
               if not os.path.exists(os.path.join(run, f))]
    if missing:
      warn(f'{run}: no {" or ".join(missing)} (unfinished or not a run), skipped')
    else:
      usable.append(run)
  if not usable:
    raise FileNotFoundError(f'no finished run in {" ".join(paths)}: a run folder holds '
                            'config.json and results.json (python -m seqcompress_jax.main '
                            'writes them when training ends)')
  return usable


def _is_run(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, f)) for f in ('results.json', 'config.json'))


# ------------------------------------------------------------------- rows ---
def cprec_variant(model: ml_collections.ConfigDict) -> str | None:
  """CpRec's 'blocks/sharing' of a `model` config section (e.g.
  'both/cross-block'), None for a model without blocks or sharing."""
  block_input = model.get('embedding', 'full') == 'block'
  block_softmax = model.get('head', 'full') == 'adaptive'
  sharing = model.get('sharing', 'none')
  if not (block_input or block_softmax or sharing != 'none'):
    return None
  blocks = {(True, True): 'both', (True, False): 'block-input',
            (False, True): 'block-softmax', (False, False): 'full'}[block_input, block_softmax]
  return f'{blocks}/{sharing}'


def method_name(config: ml_collections.ConfigDict) -> str:
  """A run's method from its config: 'NextItNet', 'CpRec both/cross-block
  (NextItNet)', 'CANet cost 0.1 (SASRec)', 'CANet cost 0.3 (CpRec
  both/cross-block, SASRec)'; a sampled softmax is named after the backbone."""
  model = config.model
  name = BACKBONES.get(model.backbone, model.backbone)
  if model.get('head') == 'sampled':
    name += ', sampled softmax'
  variant = cprec_variant(model)
  routed = bool(model.get('route_embed_dims'))
  if variant and routed:
    name = f'CpRec {variant}, {name}'
  elif variant:
    name = f'CpRec {variant} ({name})'
  if routed:
    name = f'CANet cost {config.canet.cost_weight:g} ({name})'
  return name


def compression_ratio(config: ml_collections.ConfigDict, results: dict[str, Any],
                      workdir: str) -> float | str:
  """Parameters of the uncompressed twin of the same widths (full embedding
  and softmax, no sharing: compression.uncompressed) / the run's parameters.
  From the run's compression report when it has one; 1 for a model without
  CpRec blocks or sharing (its own twin); otherwise the twin is sized from the
  run's config and dataset, and '' (with a warning) if that cannot be loaded."""
  if 'compression' in results:
    return results['compression']['ratio']['params_total']
  if cprec_variant(config.model) is None:
    return 1.0
  try:
    dataset = load_dataset(config.data)
    spec = ModelSpec.from_config(config.model, dataset.num_items, dataset.item_count)
  except (ConfigError, DataError, OSError) as e:
    warn(f'{workdir}: no compression (its dataset does not load: {e})')
    return ''
  twin = compression.sizes(compression.uncompressed(spec))['params']['total']
  return twin / results['params']['total']


def run_row(workdir: str, name: str) -> dict[str, Any]:
  """One row of the table (COLUMNS) for a finished run, plus its 'workdir'.
  'MACs/seq' is the model's at inference (a routed model's: its full route);
  'routed MACs/seq' the test average over the routes chosen (= 'MACs/seq'
  without routing; the router's own MACs are not included), 'routed MACs %'
  that average as a share of 'MACs/seq'. The speed-ups (uncompressed time /
  the run's, for a train step and a full ranking) come from the run's
  compression report, '' without one."""
  with open(os.path.join(workdir, 'results.json')) as f:
    r = json.load(f)
  config = rundir.read_config(workdir)
  macs = r['macs_per_sequence']['inference']
  routed = r['test']['routing']['macs']['inference'] if 'routing' in r['test'] else macs
  ratio = r['compression']['ratio'] if 'compression' in r else {}
  return {'run': name, 'method': method_name(config), 'params': r['params']['total'],
          'compression': compression_ratio(config, r, workdir), 'MACs/seq': macs,
          'routed MACs/seq': routed, 'routed MACs %': 100 * routed / macs,
          'train seq/s': r['throughput']['sequences_per_s'],
          'valid NDCG@10': r['valid']['NDCG@10'], 'test NDCG@10': r['test']['NDCG@10'],
          'test HR@10': r['test']['HR@10'], 'train s': r['train_s'],
          'step speed-up': ratio.get('train_step_time', ''),
          'ranking speed-up': ratio.get('full_ranking_time', ''), 'workdir': workdir}


def table_rows(run_dirs: Sequence[str]) -> list[dict[str, Any]]:
  """One row per run, in order; runs are named by their folder (the path
  itself where two folders share a name)."""
  names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  if len(set(names)) < len(names):
    names = [os.path.normpath(d) for d in run_dirs]
  return [run_row(d, name) for d, name in zip(run_dirs, names)]


# ------------------------------------------------------------------ table ---
def _number(digits: int) -> Callable[[Any], str]:
  return lambda v: '' if v == '' else f'{v:,.{digits}f}'


FORMATS: dict[str, Callable[[Any], str]] = {
    'params': _number(0), 'MACs/seq': _number(0), 'routed MACs/seq': _number(0),
    'routed MACs %': _number(1), 'train seq/s': _number(0), 'train s': _number(0),
    'valid NDCG@10': _number(4), 'test NDCG@10': _number(4), 'test HR@10': _number(4),
    **{c: (lambda v: '' if v == '' else f'{v:.2f}x')
       for c in ('compression', 'step speed-up', 'ranking speed-up')}}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  """The Markdown table of `rows` (numbers rounded for reading)."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
  lines += ['| ' + ' | '.join(FORMATS.get(c, str)(row[c]) for c in COLUMNS) + ' |'
            for row in rows]
  return '\n'.join(lines) + '\n'


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
  """The CSV of `rows` (COLUMNS, full precision)."""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction='ignore')
  writer.writeheader()
  writer.writerows(rows)
  return out.getvalue()


def write_report(rows: Sequence[dict[str, Any]], out: str) -> list[str]:
  """Writes out/table.md, out/table.csv and, where matplotlib is installed,
  the PLOTS (each atomically); returns the paths written."""
  written = [os.path.join(out, name) for name in ('table.md', 'table.csv')]
  atomic_write(written[0], markdown(rows).encode())
  atomic_write(written[1], csv_text(rows).encode())
  if plot_all(rows, out):
    written += [os.path.join(out, name) for name in PLOTS]
  else:
    warn("matplotlib is not installed: no plots written (pip install -e '.[plot]')")
  return written


# ------------------------------------------------------------------ plots ---
def read_curves(workdir: str, series: dict[str, tuple[str, str]] | None = None
                ) -> dict[str, list[tuple[int, float]]]:
  """(step, value) pairs of metrics.jsonl for each named (split, key) of
  `series` (default: 'loss' of train and 'NDCG@10' of valid), sorted by step,
  the last line kept where a resumed run logged a step twice."""
  series = series or {'loss': ('train', 'loss'), 'NDCG@10': ('valid', 'NDCG@10')}
  curves: dict[str, dict[int, float]] = {name: {} for name in series}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    warn(f'{workdir}: no metrics.jsonl, no training curve')
    return {k: [] for k in curves}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:  # A line cut short when a run was killed.
        warn(f'{path}:{number}: not JSON, skipped')
        continue
      for name, (split, key) in series.items():
        if entry.get('split') == split and key in entry:
          curves[name][entry['step']] = entry[key]
  return {k: sorted(v.items()) for k, v in curves.items()}


def _labels(rows: Sequence[dict[str, Any]]) -> list[str]:
  """Each row's method, with its run name where methods repeat."""
  methods = [row['method'] for row in rows]
  return [m if methods.count(m) == 1 else f'{m} [{row["run"]}]'
          for m, row in zip(methods, rows)]


def plot_all(rows: Sequence[dict[str, Any]], out: str) -> bool:
  """Writes the PLOTS into `out`; False (nothing written) without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  labels = _labels(rows)
  # Ten colours, then the next marker and line style: every run looks different.
  styles = [dict(color=plt.get_cmap('tab10')(i % 10), marker='osD^vP*X'[i // 10 % 8],
                 linestyle=('-', '--', ':', '-.')[i // 10 % 4]) for i in range(len(rows))]
  legend = dict(fontsize=8, loc='upper left', bbox_to_anchor=(1.05, 1), borderaxespad=0)

  def save(fig: Any, name: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
    plt.close(fig)
    atomic_write(os.path.join(out, name), buffer.getvalue())

  for name, column, xlabel, log in (
      (PLOTS[0], 'params', 'parameters (log scale)', True),
      (PLOTS[1], 'routed MACs/seq', 'MACs per sequence at inference (routed: test average)',
       False)):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, label, style in zip(rows, labels, styles):
      ax.scatter(row[column], row['test NDCG@10'], label=label, s=40, color=style['color'],
                 marker=style['marker'])
    if log:
      ax.set_xscale('log')
      ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
      ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.xaxis.set_major_formatter(ticker.EngFormatter())
    ax.margins(0.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('test NDCG@10')
    ax.grid(alpha=0.3)
    ax.legend(**legend)
    save(fig, name)

  fig, (loss_ax, ndcg_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
  later_losses = []  # All but each run's first logged loss (its warm-up interval).
  for row, label, style in zip(rows, labels, styles):
    curves = read_curves(row['workdir'])
    later_losses += [loss for _, loss in curves['loss'][1:]]
    for ax, key, marker in ((loss_ax, 'loss', None), (ndcg_ax, 'NDCG@10', style['marker'])):
      if curves[key]:
        ax.plot(*zip(*curves[key]), color=style['color'], linestyle=style['linestyle'],
                marker=marker, markersize=3, linewidth=1, label=label)
  low, high = min(later_losses, default=0), max(later_losses, default=0)
  if high > low:  # The first losses would squash the rest against the bottom.
    loss_ax.set_ylim(low - 0.05 * (high - low), high + 0.15 * (high - low))
  for ax, ylabel in ((loss_ax, 'train loss (first logged values may lie above)'),
                     (ndcg_ax, 'valid NDCG@10')):
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  if ndcg_ax.get_legend_handles_labels()[0]:  # Some run has a validation curve.
    ndcg_ax.legend(**legend)
  fig.tight_layout()
  save(fig, PLOTS[2])
  return True


# ------------------------------------------------------------------- main ---
def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError('give one or more run folders, folders of runs or globs')
  try:
    rows = table_rows(find_runs(argv[1:]))
  except FileNotFoundError as e:
    sys.exit(f'error: {e}')
  print(markdown(rows), end='')
  if flags.FLAGS.out:
    print('wrote ' + ', '.join(write_report(rows, flags.FLAGS.out)))


if __name__ == '__main__':  # Flags here, not at import: launch/sweep.py imports this module.
  flags.DEFINE_string('out', None, 'Folder for table.md, table.csv and the plots '
                      '(default: print the table only).')
  app.run(main)
