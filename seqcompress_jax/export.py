"""Exporting a trained run for serving, and loading an export (issue 7).

  python -m seqcompress_jax.main --workdir=runs/cprec --mode=export   # -> runs/cprec/export
  model = export.load('runs/cprec/export')       # needs jax and numpy only
  scores, items = model.topk(histories)          # item indices [B, max_len] -> [B, k]
  indices, unknown = model.indices(['50', '172'])  # raw item ids -> item indices

An export is a directory, written atomically (a sibling temp directory,
renamed into place):

  manifest.json   format version, model kind, the run's config and metrics,
                  sizes, k, max_len, platform, buckets, the functions and
                  their files, and the sha256 of every other file
  params.npz      the parameters (the best checkpoint, else the latest), one
                  array per '/'-joined path (e.g. 'head/kernel')
  items.npz       raw_item [V]: the raw id of every item index (index 0 is
                  PAD, its entry a placeholder)
  *.jaxexport     the inference functions, serialized jax.export modules

The parameters are an npz rather than an orbax checkpoint: one file that
numpy reads without pickle and without the model code, whose hash the
manifest checks, in the flat path -> array layout from which the loader
rebuilds the functions' arguments.

The functions take left-padded item-index histories [B, max_len] (int32, PAD
= 0) and a flag `exclude` (bool scalar: leave out the items of each history)
and give the top k item indices [B, k] (int32, best first, never PAD) with
their scores [B, k] (float32: the full softmax's logits, the adaptive
softmax's exact log p); an entry that cannot be filled (every other item left
out) has score -inf. A plain or CpRec model exports one function, `topk`. A
CANet model exports `router` (histories -> the argmax route [B]) and, for
every route R, `topk_route_R`, its truly sliced sub-model; the loader groups
the rows by route on the host and puts the results back in order.

Each function takes a symbolic batch size (one module serves any batch),
except with the adaptive softmax's fast exact top-k
(blocks.AdaptiveSoftmax.topk, the default for CpRec's head): it sizes its
buffers from the batch size, so it is exported once per size in the
manifest's `buckets`. The loader runs every
function on batches padded to those sizes, so each compiles a bounded number
of times.

The writer imports the model code only when called: importing this module
and `load` need jax and numpy only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqcompress_jax import buckets as buckets_lib

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
PARAMS = 'params.npz'
ITEMS = 'items.npz'
DEFAULT_K = 50
BUCKETS = (1, 8, 64, 256, 1024)
TOPK_METHODS = ('fast', 'full')  # Of the adaptive softmax, see export_run.
ANY_BATCH = 'any'  # The `files` key of a function with a symbolic batch size.
PAD = 0
ROUTER = 'router'

SIGNATURES = {  # In the manifest, for readers in other languages.
    'topk': '(params, items int32 [B, max_len], exclude bool []) -> '
            '(scores float32 [B, k], items int32 [B, k])',
    'router': '(params, items int32 [B, max_len]) -> routes int32 [B] (argmax)'}

Candidates = Callable[[int], tuple[jax.Array, jax.Array]]


class ExportError(Exception):
  """An export that cannot be written as asked, or a directory that is not a
  sound export (missing, corrupted, or its files do not fit its manifest)."""


def top_items(candidates: Candidates, catalogue_size: int, num_items: int, k: int,
              items: jax.Array, exclude: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The best k item indices [B, k] (int32) of each history and their scores.

  `candidates(n)` gives the model's best n (scores, ids) [B, n] over its
  catalogue of `catalogue_size` ids; n leaves room for what is dropped here:
  PAD, ids >= `num_items` (a catalogue padded beyond the real items) and,
  where `exclude`, the items of the history `items` [B, L]. Dropped entries
  score -inf and sort last.
  """
  wanted = min(k + (catalogue_size - num_items) + items.shape[1], catalogue_size - 1)
  scores, ids = candidates(wanted)
  seen = (ids[:, :, None] == items[:, None, :]).any(axis=-1)
  drop = (ids == PAD) | (ids >= num_items) | (exclude & seen)
  scores, order = jax.lax.top_k(jnp.where(drop, -jnp.inf, scores), k)
  return scores, jnp.take_along_axis(ids, order, axis=1).astype(jnp.int32)


def model_kind(model_config: Any) -> str:
  """'canet' (routed), 'cprec' (blocks or layer sharing) or 'uncompressed'."""
  if model_config.get('route_embed_dims'):
    return 'canet'
  compressed = (model_config.get('embedding') == 'block'
                or model_config.get('head') == 'adaptive'
                or model_config.get('sharing', 'none') != 'none')
  return 'cprec' if compressed else 'uncompressed'


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """A nested dict as {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    if '/' in key:
      raise ValueError(f'parameter name {prefix}{key!r} contains "/"')
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}/'))
    else:
      flat[prefix + key] = value
  return flat


def _unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    *parents, name = path.split('/')
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[name] = value
  return tree


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# ---------------------------------------------------------------- writing ---
def export_run(workdir: str, export_dir: str | None = None, k: int = DEFAULT_K,
               buckets: Sequence[int] = BUCKETS, topk: str = 'fast') -> dict[str, Any]:
  """Writes the export of the run in `workdir` to `export_dir` (default
  workdir/export; an export already there is replaced) and returns its
  manifest. Loads the run's dataset (for the raw item ids) as training does.

  `topk` picks how an adaptive softmax finds its top k: 'fast', its exact
  fast top-k (opens a tail only for the rows that may need it; one module
  per bucket), or 'full', lax.top_k over its exact log-probabilities of
  every item (one module for any batch). Other heads ignore it.
  """
  # pylint: disable=g-import-not-at-top
  from seqcompress_jax import rundir
  from seqcompress_jax.data import load_dataset
  from seqcompress_jax.models.spec import ModelSpec

  export_dir = os.path.abspath(export_dir or os.path.join(workdir, 'export'))
  buckets = buckets_lib.check_buckets(buckets)
  if topk not in TOPK_METHODS:
    raise ExportError(f'topk: expected one of {TOPK_METHODS}, got {topk!r}')
  config = rundir.read_config(workdir)
  dataset = load_dataset(config.data)
  num_items = dataset.num_items
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_items - 1:
    raise ExportError(f'k: expected an integer in [1, {num_items - 1}] (the items), '
                      f'got {k!r}')
  spec = ModelSpec.from_config(config.model, num_items, dataset.item_count)
  params, checkpoint = rundir.restore_params(config, spec, workdir)
  params = jax.device_get(params)
  fast = spec.head == 'adaptive' and topk == 'fast'
  parts = {ROUTER: params.get(ROUTER),
           'model': {key: value for key, value in params.items() if key != ROUTER}}

  parent = os.path.dirname(export_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-export-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's are private.
  try:
    functions = {}
    exported = _functions(spec, num_items, k, fast, config.eval.chunk_size)
    for name, (fn, part, per_bucket, extra) in exported.items():
      files = {}
      for size in buckets if per_bucket else (ANY_BATCH,):
        batch = jax.export.symbolic_shape('batch')[0] if size == ANY_BATCH else size
        args = [jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), parts[part]),
                jax.ShapeDtypeStruct((batch, spec.max_len), jnp.int32)]
        if part == 'model':
          args.append(jax.ShapeDtypeStruct((), jnp.bool_))
        files[str(size)] = name + ('' if size == ANY_BATCH else f'.b{size}') + '.jaxexport'
        with open(os.path.join(tmp, files[str(size)]), 'wb') as f:
          f.write(jax.export.export(jax.jit(fn))(*args).serialize())
      functions[name] = {'params': part, 'files': files, **extra}
    np.savez(os.path.join(tmp, PARAMS), **{
        path: np.asarray(x) for path, x in _flatten(params).items()})
    np.savez(os.path.join(tmp, ITEMS), raw_item=dataset.raw_item)
    manifest = _manifest(workdir, config, spec, params, checkpoint, num_items, k, buckets,
                         'fast' if fast else 'full', functions, tmp)
    with open(os.path.join(tmp, MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=2)
    _replace(tmp, export_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _functions(spec: Any, num_items: int, k: int, fast: bool,
               chunk_size: int) -> dict[str, tuple]:
  """name -> (fn, its parameters ('model' or 'router'), one module per
  bucket?, manifest extras) of every function of the export; `fast`: the
  adaptive softmax's fast top-k; otherwise the top k of the head's scores,
  `chunk_size` items at a time (evaluate.chunked_top_k: no [B, V] array)."""
  # pylint: disable=g-import-not-at-top
  from seqcompress_jax import evaluate
  from seqcompress_jax import step as step_lib
  from seqcompress_jax.models import routing
  from seqcompress_jax.models.model import Recommender

  model = Recommender(spec)

  def candidates(module: Recommender, inputs: jax.Array, route: routing.Route | None,
                 n: int) -> tuple[jax.Array, jax.Array]:
    hidden = module(inputs, train=False, route=route)[:, -1]
    if fast:
      return module.head.topk(hidden, n)  # Exact, and skips the tails it can.
    context = module.rank_context(hidden)  # The adaptive head's score: exact log p.
    return evaluate.chunked_top_k(lambda ids: module.score(context, ids), spec.num_items, n,
                                  chunk_size)

  def topk_fn(route: routing.Route | None) -> Callable[..., Any]:
    def topk(params: dict, items: jax.Array, exclude: jax.Array):
      def best(n: int) -> tuple[jax.Array, jax.Array]:
        return model.apply({'params': params}, items, route, n, method=candidates)
      return top_items(best, spec.num_items, num_items, k, items, exclude)
    return topk

  if not spec.routed:  # The fast top-k sizes its buffers from the batch: per bucket.
    return {'topk': (topk_fn(None), 'model', fast, {})}
  functions = {ROUTER: (lambda params, items: step_lib.choose_routes(
      spec, {ROUTER: params}, items), ROUTER, False, {})}
  for index, route in enumerate(routing.RoutingSpace.of(spec).routes):
    functions[f'topk_route_{index}'] = (topk_fn(route), 'model', fast,
                                        {'route': list(route)})
  return functions


def _manifest(workdir: str, config: Any, spec: Any, params: dict, checkpoint: str,
              num_items: int, k: int, buckets: tuple[int, ...], topk: str,
              functions: dict, directory: str) -> dict[str, Any]:
  results_path = os.path.join(workdir, 'results.json')
  metrics = None
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    metrics = {split: results.get(split) for split in ('valid', 'test')}
  files = sorted(os.listdir(directory))
  leaves = jax.tree.leaves(params)
  return {
      'format_version': FORMAT_VERSION,
      'kind': model_kind(config.model),
      'source': {'workdir': os.path.abspath(workdir), 'checkpoint': checkpoint},
      'k': k, 'max_len': spec.max_len, 'num_items': num_items,
      'catalogue_size': spec.num_items, 'buckets': list(buckets),
      'topk_method': topk,
      'platform': jax.default_backend(),
      'functions': functions,
      'signatures': SIGNATURES if spec.routed else {'topk': SIGNATURES['topk']},
      'sizes': {'params': int(sum(x.size for x in leaves)),
                'params_bytes': int(sum(x.nbytes for x in leaves)),
                'file_bytes': {name: os.path.getsize(os.path.join(directory, name))
                               for name in files}},
      'sha256': {name: _sha256(os.path.join(directory, name)) for name in files},
      'metrics': metrics,
      'config': json.loads(config.to_json_best_effort()),
  }


def _replace(tmp: str, target: str) -> None:
  """Renames the finished `tmp` to `target`; an existing `target` is moved
  aside first and removed after, so that no reader sees a partial export."""
  old = None
  if os.path.exists(target):
    old = tempfile.mkdtemp(prefix='.old-export-', dir=os.path.dirname(target))
    os.rename(target, os.path.join(old, 'export'))
  os.rename(tmp, target)
  if old is not None:
    shutil.rmtree(old)


# ---------------------------------------------------------------- loading ---
class Export:
  """A loaded export: top-k item indices of item-index histories (`topk`),
  the CANet routes (`routes`), and the raw item id <-> index mapping."""

  def __init__(self, directory: str, manifest: dict[str, Any], params: dict,
               raw_item: np.ndarray, programs: dict[str, dict[str, Callable]]):
    self.directory, self.manifest = directory, manifest
    self.k, self.max_len = manifest['k'], manifest['max_len']
    self.num_items, self.kind = manifest['num_items'], manifest['kind']
    self.buckets = tuple(manifest['buckets'])
    self.raw_item = raw_item
    self.routed = ROUTER in programs
    self._params = {part: jax.device_put(tree) for part, tree in params.items()}
    self._programs = programs
    integer_ids = raw_item.dtype.kind in 'iu'
    self._key = _integer_key if integer_ids else str
    self._index = {self._key(raw): index for index, raw in enumerate(raw_item.tolist())
                   if index != PAD}

  def indices(self, raw_ids: Sequence[Any]) -> tuple[list[int], list[Any]]:
    """The item indices of the known raw ids, in order, and the unknown ids."""
    known, unknown = [], []
    for raw in raw_ids:
      index = self._index.get(self._key(raw))
      if index is None:
        unknown.append(raw)
      else:
        known.append(index)
    return known, unknown

  def raw_ids(self, indices: np.ndarray) -> list:
    """The raw ids (Python ints or strs) of item indices."""
    return self.raw_item[np.asarray(indices)].tolist()

  def routes(self, items: np.ndarray) -> np.ndarray:
    """int32 [B]: the route the router picks for each history (CANet only)."""
    if not self.routed:
      raise ValueError(f'{self.directory} holds a {self.kind} model, which has no router')
    items = self._check_items(items)
    out = np.zeros(len(items), np.int32)
    pending = self._run(ROUTER, np.arange(len(items)), items)
    for chunk, routes in pending:
      out[chunk] = np.asarray(routes)[:len(chunk)]
    return out

  def topk(self, items: np.ndarray, exclude_history: bool = False
           ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded item-index histories [B, max_len] -> the scores [B, k]
    (float32, best first) and item indices [B, k] (int32) of the top k;
    `exclude_history` leaves out each history's own items (their entries
    may then run out: score -inf, index undefined)."""
    items = self._check_items(items)
    rows = np.arange(len(items))
    if self.routed:
      routes = self.routes(items)
      groups = [(f'topk_route_{route}', rows[routes == route]) for route in np.unique(routes)]
    else:
      groups = [('topk', rows)]
    exclude = np.bool_(exclude_history)
    pending = [result for name, group in groups
               for result in self._run(name, group, items, exclude)]
    scores = np.zeros((len(items), self.k), np.float32)
    ids = np.zeros((len(items), self.k), np.int32)
    for chunk, (chunk_scores, chunk_ids) in pending:  # Dispatched all before reading any.
      scores[chunk] = np.asarray(chunk_scores)[:len(chunk)]
      ids[chunk] = np.asarray(chunk_ids)[:len(chunk)]
    return scores, ids

  def _run(self, name: str, rows: np.ndarray, items: np.ndarray, *args: Any) -> list:
    """[(chunk, result)]: function `name` dispatched on `rows` of `items`,
    padded to bucket sizes."""
    entry = self.manifest['functions'][name]
    programs, params = self._programs[name], self._params[entry['params']]
    results = []
    for chunk, bucket in buckets_lib.chunks(rows, self.buckets):
      program = programs.get(str(bucket)) or programs[ANY_BATCH]
      results.append((chunk, program(params, buckets_lib.pad_rows(items[chunk], bucket),
                                     *args)))
    return results

  def _check_items(self, items: np.ndarray) -> np.ndarray:
    items = np.asarray(items)
    if items.ndim != 2 or items.shape[1] != self.max_len or items.dtype.kind not in 'iu':
      raise ValueError(f'items: expected integer item indices [B, {self.max_len}], got '
                       f'{items.dtype} {items.shape}')
    if items.size and (items.min() < 0 or items.max() >= self.num_items):
      raise ValueError(f'items: expected item indices in [0, {self.num_items}), got '
                       f'[{items.min()}, {items.max()}]')
    return items.astype(np.int32)


def _integer_key(raw: Any) -> str | None:
  """The canonical key of a raw id in a catalogue of integer ids ('007' and 7
  are item 7), or None when it is not an integer."""
  if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
    return str(int(raw))
  try:
    return str(int(str(raw).strip()))
  except ValueError:
    return None


def load(directory: str) -> Export:
  """Reads and checks the export in `directory`: the manifest, every file's
  sha256, the parameters against the functions' inputs. Raises ExportError."""
  manifest = _read_manifest(directory)
  for name, digest in manifest['sha256'].items():
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise ExportError(f'{path}: missing (listed in {MANIFEST})')
    if _sha256(path) != digest:
      raise ExportError(f'{path}: sha256 differs from {MANIFEST}: the file is corrupted or '
                        'from another export')
  params = _read_npz(directory, PARAMS)
  raw_item = _read_npz(directory, ITEMS).get('raw_item')
  if raw_item is None or raw_item.shape != (manifest['num_items'],):
    raise ExportError(f'{os.path.join(directory, ITEMS)}: expected raw_item of shape '
                      f"({manifest['num_items']},) (num_items in {MANIFEST})")
  tree = _unflatten(params)
  parts = {'model': {key: value for key, value in tree.items() if key != ROUTER}}
  if ROUTER in tree:
    parts[ROUTER] = tree[ROUTER]
  programs = {}
  for name, entry in manifest['functions'].items():
    if entry['params'] not in parts:
      raise ExportError(f"{os.path.join(directory, MANIFEST)}: function {name!r} takes "
                        f"parameters {entry['params']!r}, which {PARAMS} does not hold")
    programs[name] = {size: _deserialize(directory, file, parts[entry['params']])
                      for size, file in entry['files'].items()}
  return Export(directory, manifest, parts, raw_item, programs)


_MANIFEST_FIELDS = {'format_version': int, 'kind': str, 'k': int, 'max_len': int,
                    'num_items': int, 'buckets': list, 'functions': dict, 'sha256': dict}


def _read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isdir(directory):
    raise ExportError(f'{directory}: no such export directory')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError as e:
    raise ExportError(f'{path}: missing: {directory} is not an export '
                      '(write one with --mode=export)') from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportError(f'{path}: not valid JSON ({e})') from e
  if not isinstance(manifest, dict):
    raise ExportError(f'{path}: expected a JSON object')
  for field, kind in _MANIFEST_FIELDS.items():
    if not isinstance(manifest.get(field), kind) or isinstance(manifest.get(field), bool):
      raise ExportError(f'{path}: field {field!r}: expected {kind.__name__}, got '
                        f'{manifest.get(field)!r}')
  if manifest['format_version'] != FORMAT_VERSION:
    raise ExportError(f"{path}: field 'format_version': this code reads version "
                      f"{FORMAT_VERSION}, got {manifest['format_version']}")
  try:
    buckets_lib.check_buckets(manifest['buckets'])
  except (ValueError, TypeError) as e:
    raise ExportError(f"{path}: field 'buckets': {e}") from e
  for name, entry in manifest['functions'].items():
    if (not isinstance(entry, dict) or entry.get('params') not in ('model', ROUTER)
        or not isinstance(entry.get('files'), dict) or not entry['files']):
      raise ExportError(f'{path}: field functions.{name}: expected {{"params": "model" or '
                        f'"router", "files": {{batch: file}}}}, got {entry!r}')
  names = set(manifest['functions'])
  if names != {'topk'} and not (ROUTER in names and len(names) > 1):
    raise ExportError(f"{path}: field 'functions': expected 'topk', or 'router' and "
                      f'topk_route_R, got {sorted(names)}')
  return manifest


def _read_npz(directory: str, name: str) -> dict[str, np.ndarray]:
  path = os.path.join(directory, name)
  try:
    with np.load(path, allow_pickle=False) as z:
      return {key: z[key] for key in z.files}
  except (OSError, ValueError) as e:
    raise ExportError(f'{path}: cannot read ({e})') from e


def _deserialize(directory: str, file: str, params: dict) -> Callable:
  """The jitted call of a serialized function, checked against `params` and
  this platform."""
  path = os.path.join(directory, file)
  try:
    with open(path, 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except OSError as e:
    raise ExportError(f'{path}: cannot read ({e})') from e
  except Exception as e:  # The flatbuffer parser raises various errors.
    raise ExportError(f'{path}: not a serialized jax.export function ({e})') from e
  platform = jax.default_backend()
  if platform not in exported.platforms:
    raise ExportError(f'{path}: exported for {", ".join(exported.platforms)}, cannot run on '
                      f'{platform}')
  args, _ = jax.tree.unflatten(exported.in_tree, exported.in_avals)
  try:
    expected = _flatten(args[0])
  except (AttributeError, TypeError) as e:
    raise ExportError(f'{path}: its first input is not a parameter dict') from e
  got = {path_: (x.shape, x.dtype) for path_, x in _flatten(params).items()}
  want = {path_: (aval.shape, aval.dtype) for path_, aval in expected.items()}
  if got != want:
    differ = sorted(p for p in set(got) | set(want) if got.get(p) != want.get(p))
    raise ExportError(f'{path}: {PARAMS} does not hold the parameters it takes (they differ '
                      f'at {", ".join(differ[:5])}); the files are from different exports')
  return jax.jit(exported.call)
