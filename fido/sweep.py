"""Sweeps: benchmark (and optionally train + evaluate) a list of config overrides, and report them.

`run_sweep(config, workdir)` reads `config.sweep` (see experiments/ablations.py):
  name, title          the sweep and its heading
  base                 a config spec 'path/to/file.py[:arg]' (`fido.config.load_config_file`)
  runs                 [{name, overrides: {dotted.key: value}, paper: {total_ms, decoder_ms},
                         group, series, x}]; overrides must name existing fields
  modes                'bench' or 'bench,train'
  train_base, train_sections   when training: these sections come from the `train_base` spec
                       (before the run's overrides), e.g. the embedded default's synthetic data
  max_batch            record `fido.bench.max_batch_search` per run and cap its batch sizes at it
  paper_setting        where the paper's numbers come from (shown under the table)

and writes into `workdir`:
  runs/<run>/result.json   per run (atomic): its overrides, resolved config, bench results (one
                           per batch size), max-batch search, train/eval result. A run whose
                           result.json already holds what `modes` asks for is skipped, so an
                           interrupted sweep resumes; one made from a different config is refused.
  runs/<run>/...           the training workdir (checkpoints, metrics.jsonl) when training
  results.jsonl            one line per run (result.json without the config)
  results.md               the table, in the paper's layout, with ratios to the first row
  *.png                    breakdown.png (encoder/decoder stacked bars; paper Fig. 1/2),
                           time_vs_<group>.png (line plots: Fig. 4 period, Fig. 6 passages and
                           target length), em_vs_time.png (EM against time; Fig. 3/5) if trained
"""

import copy
import json
import os
import re
import time
from typing import Any, Mapping, Sequence

import ml_collections

from fido import bench as bench_lib
from fido.config import ConfigError, load_config_file, validate_model_config

MODES = ('bench', 'train')
BENCH_SECTIONS = ('model', 'bench')                       # what a bench result depends on
TRAIN_SECTIONS = ('model', 'data', 'train', 'optimizer', 'init', 'eval')  # ... and a trained one
AXIS_LABELS = {'passages': 'retrieved passages', 'target_len': 'target length (tokens)',
               'lsa_period': 'cross-attention period K (LSA)'}


# ------------------------------------------------------------------------------------- configs


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    context: str = '') -> ml_collections.ConfigDict:
  """Sets each 'section.field' of `overrides` in place; a key that is not a field is an error."""
  where = f'{context}: ' if context else ''
  for key, value in overrides.items():
    parts = key.split('.')
    node, path = config, 'config'
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f'{where}override {key!r}: {path} has no field {part!r}'
                          + (f'; known: {known}' if known else f' ({path} is not a section)'))
      if i < len(parts) - 1:
        node, path = node[part], f'{path}.{part}'
    if isinstance(node[parts[-1]], ml_collections.ConfigDict):
      raise ConfigError(f'{where}override {key!r}: config.{key} is a section; override its fields')
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f'{where}override {key}={value!r}: {e}') from e
  return config


def run_config(sweep: ml_collections.ConfigDict, run: Mapping[str, Any], *, train: bool = False
               ) -> ml_collections.ConfigDict:
  """The run's config: the base spec (+ the train base's sections when training) + its overrides."""
  config = load_config_file(sweep.base)
  if train and sweep.get('train_base'):
    train_base = load_config_file(sweep.train_base)
    for section in sweep.train_sections:
      config[section] = copy.deepcopy(train_base[section])
  context = f'sweep {sweep.name!r} run {run["name"]!r}'
  apply_overrides(config, run.get('overrides', {}), context)
  try:
    validate_model_config(config.model)
  except ConfigError as e:
    raise ConfigError(f'{context}: {e}') from e
  config.name = f'{sweep.name}/{run["name"]}'
  return config


def parse_modes(modes: str) -> tuple[str, ...]:
  parsed = tuple(m.strip() for m in modes.split(',') if m.strip())
  if 'bench' not in parsed or any(m not in MODES for m in parsed):
    raise ConfigError(f'config.sweep.modes={modes!r}: expected "bench" or "bench,train"')
  return parsed


def slug(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.=-]+', '-', name).strip('-.') or 'run'


# ------------------------------------------------------------------------------------- results


def _atomic_write(path: str, data: str | bytes) -> None:
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  os.replace(tmp, path)


def _jsonable(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=str))


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
  if not isinstance(tree, Mapping):
    return {prefix: tree}
  return {k: v for key, sub in tree.items() for k, v in _flat(sub, f'{prefix}.{key}').items()}


def _changed_fields(stored: Mapping[str, Any], current: Mapping[str, Any],
                    sections: Sequence[str]) -> list[str]:
  old, new = (_flat({s: tree.get(s) for s in sections}, 'config') for tree in (stored, current))
  return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _load_result(run_dir: str, config_json: dict, modes: Sequence[str]) -> dict | None:
  """The stored result.json, checked against the run's config; None if there is none."""
  path = os.path.join(run_dir, 'result.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    result = json.load(f)
  sections = list(BENCH_SECTIONS)
  if 'train' in modes and 'train' in result:
    sections += [s for s in TRAIN_SECTIONS if s not in sections]
  changed = _changed_fields(result.get('config', {}), config_json, sections)
  if changed:
    more = f' and {len(changed) - 5} more' if len(changed) > 5 else ''
    raise ConfigError(f'{path} was made from a different config ({", ".join(changed[:5])}{more} '
                      f'differ); delete {run_dir} to redo this run, or use another workdir')
  return result


def run_sweep(config: ml_collections.ConfigDict, workdir: str | None = None, *,
              verbose: bool = True) -> list[dict[str, Any]]:
  """Runs (or resumes) `config.sweep` in `workdir` (default `config.sweep.workdir`); see above."""
  from fido import train as train_lib  # pylint: disable=g-import-not-at-top
  sweep = config.sweep
  workdir = workdir or sweep.workdir
  modes = parse_modes(sweep.modes)
  runs = list(sweep.runs)
  if not runs:
    raise ConfigError(f'sweep {sweep.name!r} has no runs')
  slugs = [slug(r['name']) for r in runs]
  if len(set(slugs)) != len(slugs):
    raise ConfigError(f'sweep {sweep.name!r}: run names must be unique (as directories): {slugs}')
  # Every config is built (and validated) before anything runs: a bad override fails at once.
  configs = [run_config(sweep, r, train='train' in modes) for r in runs]
  os.makedirs(os.path.join(workdir, 'runs'), exist_ok=True)
  results, trained = [], {}   # trained: training fingerprint -> (run name, train result)
  for i, (run, run_slug, cfg) in enumerate(zip(runs, slugs, configs)):
    start = time.perf_counter()
    run_dir = os.path.join(workdir, 'runs', run_slug)
    config_json = _jsonable(cfg)
    result = _load_result(run_dir, config_json, modes)
    done = result is not None and 'bench' in result and ('train' not in modes or 'train' in result)
    if result is None:
      result = json.loads(json.dumps(dict(  # plain JSON values, as a reloaded result has
          name=run['name'], dir=run_slug, overrides=dict(run.get('overrides', {})),
          paper=dict(run.get('paper') or {}), group=run.get('group', ''),
          series=run.get('series', ''), x=run.get('x'), config=config_json)))
    os.makedirs(run_dir, exist_ok=True)
    if 'bench' not in result:
      bench_cfg = cfg
      if sweep.get('max_batch', False):   # "batch 64 or the largest that fits" (Table 3)
        largest = max(cfg.bench.batch_sizes)
        result['max_batch'] = bench_lib.max_batch_search(cfg, start=largest, limit=largest)
        cap = result['max_batch']['max_batch']
        if not cap:
          raise RuntimeError(f'sweep {sweep.name!r} run {run["name"]!r}: not even batch 1 fits '
                             f'({result["max_batch"]})')
        bench_cfg = ml_collections.ConfigDict(cfg.to_dict())
        bench_cfg.bench.batch_sizes = tuple(sorted({min(b, cap) for b in cfg.bench.batch_sizes}))
      result['bench'] = list(bench_lib.bench_model(bench_cfg))
      _atomic_write(os.path.join(run_dir, 'result.json'), json.dumps(result, indent=1))
    fingerprint = json.dumps({s: config_json.get(s) for s in TRAIN_SECTIONS}, sort_keys=True)
    if 'train' in modes and 'train' not in result:
      if fingerprint in trained:   # e.g. Fig. 6: the points differ only in the bench workload
        shared_name, shared = trained[fingerprint]
        result['train'] = dict(shared, shared_with=shared_name)
      else:
        result['train'] = json.loads(json.dumps(train_lib.train(cfg, run_dir), default=float))
      result['config'] = config_json   # its bench sections were checked equal; now the train ones
      _atomic_write(os.path.join(run_dir, 'result.json'), json.dumps(result, indent=1))
    if 'train' in result and 'shared_with' not in result['train']:
      trained.setdefault(fingerprint, (run['name'], result['train']))
    results.append(result)
    if verbose:
      print(_progress_line(sweep.name, i + 1, len(runs), result, done,
                           time.perf_counter() - start), flush=True)
  write_reports(sweep, results, workdir)
  if verbose:
    print(f'wrote {os.path.join(workdir, "results.md")}\n')
    with open(os.path.join(workdir, 'results.md')) as f:
      print(f.read(), flush=True)
  return results


def _exact_match(result: Mapping[str, Any]) -> float | None:
  train = result.get('train') or {}
  split = (result.get('config', {}).get('train') or {}).get('final_eval_split', 'test')
  em = train.get(f'{split}_exact_match')
  return None if em is None else float(em)


def _progress_line(name: str, i: int, n: int, result: Mapping[str, Any], done: bool,
                   seconds: float) -> str:
  first = result['bench'][0]
  line = (f'[sweep {name} {i}/{n}] {result["name"]}: encoder {first["encoder_ms"]:.3f} + decoder '
          f'{first["decoder_ms"]:.3f} ms/sample (batch {first["batch"]})')
  if _exact_match(result) is not None:
    line += f', EM {_exact_match(result):.3f}'
  return line + (' (done earlier)' if done else f' ({seconds:.1f} s)')


# ------------------------------------------------------------------------------------- reports


def table_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per run and batch size, with ratios to the first row at the same batch size."""
  rows = []
  for r in results:
    for b in r['bench']:
      rows.append(dict(name=r['name'], batch=b['batch'], n_passages=b['n_passages'],
                       passage_len=b['passage_len'], target_len=b['target_len'],
                       encoder_ms=b['encoder_ms'], decoder_ms=b['decoder_ms'],
                       total_ms=b['total_ms'], paper=r.get('paper') or {}, em=_exact_match(r),
                       max_batch=_max_batch_cell(r.get('max_batch')),
                       group=r.get('group', ''), series=r.get('series', ''), x=r.get('x')))
  for row in rows:
    ref = next(x for x in rows if x['batch'] == row['batch'])
    for key in ('total_ms', 'decoder_ms'):
      row[f'{key}_ratio'] = row[key] / ref[key] if ref[key] else None
      ours, theirs = row['paper'].get(key), rows[0]['paper'].get(key)
      row[f'paper_{key}_ratio'] = ours / theirs if ours is not None and theirs else None
  return rows


def _max_batch_cell(search: Mapping[str, Any] | None) -> str | None:
  if not search:
    return None
  return f'≥ {search["max_batch"]}' if search.get('hit_limit') else str(search['max_batch'])


def _num(value: float | None, ratio: bool = False) -> str:
  if value is None:
    return '–'
  return f'{value:.2f}×' if ratio else f'{value:.4g}'


def results_markdown(sweep: ml_collections.ConfigDict, results: Sequence[Mapping[str, Any]]) -> str:
  rows = table_rows(results)
  first = results[0]['bench'][0]
  workload = ('n_passages', 'passage_len', 'target_len')
  varying = [k for k in workload if len({row[k] for row in rows}) > 1]
  paper_keys = [k for k in ('total_ms', 'decoder_ms') if any(k in row['paper'] for row in rows)]
  columns = ['config', 'batch'] + [{'n_passages': 'passages', 'passage_len': 'passage len',
                                    'target_len': 'target len'}[k] for k in varying]
  columns += ['encoder ms', 'decoder ms', 'total ms', 'total ×', 'decoder ×']
  for k in paper_keys:
    columns += [f'paper {k[:-3]} ms', f'paper {k[:-3]} ×']
  trained = any(row['em'] is not None for row in rows)
  has_max = any(row['max_batch'] is not None for row in rows)
  columns += ['EM'] * trained + ['max batch'] * has_max
  shape = lambda k, text: 'as in the table' if k in varying else text
  lines = [f'# {sweep.get("title", sweep.name)}', '',
           f'Measured on {first["device"]} ({first["num_devices"]} device(s)), {first["dtype"]}; '
           f'passages: {shape("n_passages", first["n_passages"])} × '
           f'{shape("passage_len", first["passage_len"])} tokens, output tokens: '
           f'{shape("target_len", first["target_len"])}; greedy; milliseconds per sample, median '
           f'of {first["repeats"]} runs.',
           'Ratios (×) are relative to the first row at the same batch size: the paper measured '
           'on TPUv4 and we did not, so compare ratios, not milliseconds.', '',
           '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for row in rows:
    cells = [row['name'], str(row['batch'])] + [str(row[k]) for k in varying]
    cells += [_num(row['encoder_ms']), _num(row['decoder_ms']), _num(row['total_ms']),
              _num(row['total_ms_ratio'], True), _num(row['decoder_ms_ratio'], True)]
    for k in paper_keys:
      cells += [_num(row['paper'].get(k)), _num(row[f'paper_{k}_ratio'], True)]
    cells += [f'{row["em"]:.3f}' if row['em'] is not None else '–'] * trained
    cells += [row['max_batch'] or '–'] * has_max
    lines.append('| ' + ' | '.join(cells) + ' |')
  if paper_keys:
    lines += ['', f'Paper: {sweep.get("paper_setting", "")}.']
  if has_max:
    methods = sorted({r['max_batch']['method'] for r in results if r.get('max_batch')})
    lines += ['', f'max batch: {", ".join(methods)} (fido.bench.max_batch_search) up to the '
              'requested batch ("≥ B": B fits); each run is benchmarked at min(batch, max '
              'batch).']
  if trained:
    lines += ['', 'EM: exact match on the synthetic retrieval-QA test split after training each '
              'run (fido.train.train; runs that differ only in the benchmark share one training).']
  return '\n'.join(lines) + '\n'


def write_reports(sweep: ml_collections.ConfigDict, results: Sequence[Mapping[str, Any]],
                  workdir: str) -> list[str]:
  """results.jsonl, results.md and the plots; returns the paths written."""
  paths = [os.path.join(workdir, 'results.jsonl'), os.path.join(workdir, 'results.md')]
  _atomic_write(paths[0], ''.join(
      json.dumps({k: v for k, v in r.items() if k != 'config'}) + '\n' for r in results))
  _atomic_write(paths[1], results_markdown(sweep, results))
  return paths + write_plots(sweep, results, workdir)


# --------------------------------------------------------------------------------------- plots


def _save(fig, path: str) -> str:
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
  _atomic_write(path, buffer.getvalue())
  return path


def write_plots(sweep: ml_collections.ConfigDict, results: Sequence[Mapping[str, Any]],
                workdir: str) -> list[str]:
  """PNGs drawn with matplotlib's Agg canvas (no pyplot, no global backend state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  def figure(width, height):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig

  rows = table_rows(results)
  device = results[0]['bench'][0]['device']
  title = sweep.get('title', sweep.name)
  paths = []
  # Encoder/decoder time per sample, stacked (paper Figures 1 and 2).
  fig = figure(7, 0.45 * len(rows) + 1.5)
  ax = fig.add_subplot()
  labels = [f'{row["name"]} (b={row["batch"]})' for row in rows][::-1]
  enc = [row['encoder_ms'] for row in rows][::-1]
  dec = [row['decoder_ms'] for row in rows][::-1]
  ax.barh(labels, enc, label='encoder', color='tab:blue')
  ax.barh(labels, dec, left=enc, label='decoder', color='tab:orange')
  ax.set_xlabel(f'ms per sample ({device})')
  ax.set_title(title, fontsize=10)
  ax.legend(loc='lower right')
  paths.append(_save(fig, os.path.join(workdir, 'breakdown.png')))
  # Time against a swept value, one line per series (Figure 4: period; Figure 6: P and T).
  for group in sorted({row['group'] for row in rows if row['group'] and row['x'] is not None}):
    fig = figure(6, 4)
    ax = fig.add_subplot()
    group_rows = [row for row in rows if row['group'] == group]
    for series in dict.fromkeys(row['series'] for row in group_rows):
      points = sorted((row['x'], row['total_ms'], row['decoder_ms'])
                      for row in group_rows if row['series'] == series)
      xs = [p[0] for p in points]
      line, = ax.plot(xs, [p[1] for p in points], marker='o', label=f'{series} total'.strip())
      ax.plot(xs, [p[2] for p in points], marker='x', linestyle='--', color=line.get_color(),
              label=f'{series} decoder'.strip())
    ax.set_xlabel(AXIS_LABELS.get(group, group))
    ax.set_ylabel(f'ms per sample ({device})')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(_save(fig, os.path.join(workdir, f'time_vs_{slug(group)}.png')))
  # Quality against inference time (paper Figures 3 and 5).
  trained = [row for row in rows if row['em'] is not None]
  if trained:
    fig = figure(6, 4)
    ax = fig.add_subplot()
    ax.scatter([row['total_ms'] for row in trained], [row['em'] for row in trained])
    for row in trained:
      ax.annotate(row['name'], (row['total_ms'], row['em']), fontsize=8,
                  xytext=(3, 3), textcoords='offset points')
    ax.set_xlabel(f'ms per sample ({device})')
    ax.set_ylabel('exact match (synthetic test)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, os.path.join(workdir, 'em_vs_time.png')))
  return paths
