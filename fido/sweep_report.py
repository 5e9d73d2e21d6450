"""Sweep reports: results.md (the paper's tables, and exact match over seeds) and PNG plots.

Inputs are the sweep's results, one dict per run and seed (fido/sweep.py): name, seed, bench
(per batch size: encoder_ms, decoder_ms, total_ms, ...), train (the training result: test exact
match, F1, seconds), paper, group/series/x (line-plot placement), max_batch.
"""

import io
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fido.files import atomic_write

AXIS_LABELS = {'passages': 'retrieved passages', 'target_len': 'target length (tokens)',
               'lsa_period': 'cross-attention period K (LSA)'}


def slug(name: str) -> str:
  """A file name for a run or plot name."""
  return re.sub(r'[^A-Za-z0-9_.=-]+', '-', name).strip('-.') or 'run'


def exact_match(result: Mapping[str, Any]) -> float | None:
  """The run's exact match on its final evaluation split, or None if it was not trained."""
  train = result.get('train') or {}
  split = (result.get('config', {}).get('train') or {}).get('final_eval_split', 'test')
  em = train.get(f'{split}_exact_match')
  return None if em is None else float(em)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def by_run(results: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  """The results grouped by run name (one entry per seed), in sweep order."""
  groups: dict[str, list] = {}
  for r in results:
    groups.setdefault(r['name'], []).append(r)
  return groups


def table_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per run and batch size, with ratios to the first row at the same batch size."""
  rows = []
  for name, group in by_run(results).items():
    r = group[0]
    ems = [exact_match(g) for g in group if exact_match(g) is not None]
    for b in r.get('bench', ()):
      rows.append(dict(name=r['name'], batch=b['batch'], n_passages=b['n_passages'],
                       passage_len=b['passage_len'], target_len=b['target_len'],
                       encoder_ms=b['encoder_ms'], decoder_ms=b['decoder_ms'],
                       total_ms=b['total_ms'], paper=r.get('paper') or {},
                       em=mean_std(ems)[0] if ems else None,
                       max_batch=_max_batch_cell(r.get('max_batch')),
                       group=r.get('group', ''), series=r.get('series', ''), x=r.get('x'),
                       device=b['device']))
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
  """The sweep's heading, then the speed table (if benchmarked), then exact match over seeds
  (if trained)."""
  lines = [f'# {sweep.get("title", sweep.name)}', '']
  if any(r.get('bench') for r in results):
    lines += bench_markdown(sweep, results)
  if any(exact_match(r) is not None for r in results):
    lines += quality_markdown(results)
  return '\n'.join(lines) + '\n'


def bench_markdown(sweep: ml_collections.ConfigDict, results: Sequence[Mapping[str, Any]]
                   ) -> list[str]:
  """Milliseconds per sample in the paper's layout, ratios to the first row beside the paper's."""
  rows = table_rows(results)
  first = next(r for r in results if r.get('bench'))['bench'][0]
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
  lines = [f'Measured on {first["device"]} ({first["num_devices"]} device(s)), {first["dtype"]}; '
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
    lines += ['', f'max batch: {", ".join(methods)} (fido.max_batch.max_batch_search) up to the '
              'requested batch ("≥ B": B fits); each run is benchmarked at min(batch, max '
              'batch).']
  if trained:
    lines += ['', 'EM: exact match on the synthetic retrieval-QA test split after training each '
              'run (fido.train.run_train; runs that differ only in the benchmark share one training), '
              'the mean over seeds where there are several.']
  return lines + ['']


def quality_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per run: its seeds, exact match and F1 per seed, their mean and sample std, train seconds."""
  rows = []
  for name, group in by_run(results).items():
    trained = [r for r in group if exact_match(r) is not None]
    if not trained:
      continue
    ems = [exact_match(r) for r in trained]
    split = (trained[0].get('config', {}).get('train') or {}).get('final_eval_split', 'test')
    f1s = [float(r['train'].get(f'{split}_f1', float('nan'))) for r in trained]
    seconds = [float(r['train'].get('train_seconds', float('nan'))) for r in trained]
    rows.append(dict(name=name, seeds=[r.get('seed') for r in trained], exact_match=ems,
                     em_mean=mean_std(ems)[0], em_std=mean_std(ems)[1], em_min=min(ems),
                     f1_mean=mean_std(f1s)[0], train_seconds=mean_std(seconds)[0]))
  return rows


def quality_markdown(results: Sequence[Mapping[str, Any]]) -> list[str]:
  """Exact match per seed with mean ± sample std: one run per seed cannot tell a model from its
  seed (a different machine's rounding is another trajectory too)."""
  rows = quality_rows(results)
  lines = ['| run | seeds | exact match per seed | mean ± std | min | F1 mean | train s (mean) |',
           '|---|---|---|---|---|---|---|']
  for row in rows:
    seeds = ' '.join('–' if s is None else str(s) for s in row['seeds'])
    per_seed = ' '.join(f'{em:.3f}' for em in row['exact_match'])
    lines.append(f'| {row["name"]} | {seeds} | {per_seed} | {row["em_mean"]:.3f} ± '
                 f'{row["em_std"]:.3f} | {row["em_min"]:.3f} | {row["f1_mean"]:.3f} | '
                 f'{row["train_seconds"]:.0f} |')
  return ['Exact match on the test split after training (`fido.train.run_train`), per seed of '
          '`config.train.seed` (parameter init, data order, dropout); ± is the sample standard '
          'deviation over seeds.', ''] + lines + ['']


def write_reports(sweep: ml_collections.ConfigDict, results: Sequence[Mapping[str, Any]],
                  workdir: str) -> list[str]:
  """results.jsonl, results.md and the plots; returns the paths written."""
  paths = [os.path.join(workdir, 'results.jsonl'), os.path.join(workdir, 'results.md')]
  atomic_write(paths[0], ''.join(
      json.dumps({k: v for k, v in r.items() if k != 'config'}) + '\n' for r in results))
  atomic_write(paths[1], results_markdown(sweep, results))
  if not any(r.get('bench') for r in results):
    return paths
  return paths + write_plots(sweep, results, workdir)


# --------------------------------------------------------------------------------------- plots


def _save(fig, path: str) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
  atomic_write(path, buffer.getvalue())
  return path


def write_plots(sweep: ml_collections.ConfigDict, results: Sequence[Mapping[str, Any]],
                workdir: str) -> list[str]:
  """PNGs drawn with matplotlib's Agg canvas (no pyplot, no global backend state)."""

  def figure(width, height):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig

  rows = table_rows(results)
  device = rows[0]['device']
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
