"""Sweeps: train and/or benchmark a list of config overrides, over seeds, and report them.

`run_sweep(config, workdir)` reads `config.sweep` (see experiments/ablations.py):
  name, title          the sweep and its heading
  base                 a config spec 'path/to/file.py[:arg]' (`fido.config.load_config_file`)
  runs                 [{name, overrides: {dotted.key: value}, paper: {total_ms, decoder_ms},
                         group, series, x, base, init_from, convert_from}]. `base`: the run's own
                       config spec (default: the sweep's); overrides must name its fields.
                       `init_from`: the name of an earlier run whose final checkpoint (of the same
                       seed) this run starts from through `config.init` (same model; its second
                       moments carried over unless the overrides switch that off).
                       `convert_from`: the name of an earlier run, a FiD (cross-attention in every
                       layer, multi-head, one width), whose final parameters are exported to
                       Hugging Face T5 format and converted to this run's model
                       (fido.convert_fido: pooled key/value heads, layer-sparse cross-attention),
                       which this run starts from: the path of a public T5.1.1 checkpoint.
  modes                'bench', 'train' or 'bench,train'
  seeds                () trains each run once, with its config's train.seed; (s1, s2, ...) trains
                       each run once per seed (train.seed = s). A benchmark does not depend on the
                       seed: it runs once per run.
  train_base, train_sections   when training: these sections come from the `train_base` spec
                       (before the run's overrides), e.g. the embedded default's synthetic data
  max_batch            record `fido.max_batch.max_batch_search` per run and cap its batch sizes at it
  paper_setting        where the paper's numbers come from (shown under the table)

and writes into `workdir`:
  runs/<run>[-seed<s>]/result.json   per run and seed (atomic): its overrides, resolved config,
                           bench results (one per batch size), max-batch search, train/eval
                           result. A run whose result.json already holds what `modes` asks for is
                           skipped, so an interrupted sweep resumes; one made from a different
                           config is refused.
  runs/<run>[-seed<s>]/...  the training workdir (checkpoints, metrics.jsonl) when training
  jax_cache/               when training (and no JAX_COMPILATION_CACHE_DIR is set): compiled
                           programs, so that a run's later seeds do not compile again
  results.jsonl            one line per run and seed (result.json without the config)
  results.md               the paper-layout speed table with ratios to the first row, and exact
                           match per seed with mean ± std (fido/sweep_report.py)
  *.png                    breakdown.png (encoder/decoder stacked bars; paper Fig. 1/2),
                           time_vs_<group>.png (line plots: Fig. 4 period, Fig. 6 passages and
                           target length), em_vs_time.png (EM against time; Fig. 3/5) if trained
"""

import copy
import json
import os
import sys
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import ml_collections

from fido import bench as bench_lib
from fido import checkpoint, convert, convert_fido, max_batch, sweep_report
from fido import train as train_lib
from fido.config import ConfigError, config_diff, load_config_file, validate_model_config
from fido.files import atomic_write
from fido.model.fid import init_params, make_model
from fido.sweep_report import slug

MODES = ('bench', 'train')
BENCH_SECTIONS = ('model', 'bench')                       # what a bench result depends on
TRAIN_SECTIONS = ('model', 'data', 'train', 'optimizer', 'init', 'eval')  # ... and a trained one


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
  """The run's config: its base spec (the run's `base`, else the sweep's; + the train base's
  sections when training) + its overrides."""
  config = load_config_file(run.get('base') or sweep.base)
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
  if not parsed or any(m not in MODES for m in parsed):
    raise ConfigError(f'config.sweep.modes={modes!r}: expected "bench", "train" or "bench,train"')
  return parsed


# ------------------------------------------------------------------------------------- results


def _jsonable(config: ml_collections.ConfigDict) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=str))


# Fields since removed from the config (test-only fault injection, now in the tests): results
# stored while they existed still match.
RETIRED_FIELDS = frozenset({'config.train.debug_nan_at_step', 'config.train.debug_step_delay'})


def _changed_fields(stored: Mapping[str, Any], current: Mapping[str, Any],
                    sections: Sequence[str]) -> list[str]:
  return [name for name, _, _ in config_diff({s: stored.get(s) for s in sections},
                                             {s: current.get(s) for s in sections},
                                             ignore=RETIRED_FIELDS.__contains__)]


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


class SweepRun(NamedTuple):
  """One run of the sweep with one seed (None: the config's own)."""
  spec: Mapping[str, Any]
  seed: int | None
  dir: str                              # under <workdir>/runs/
  config: ml_collections.ConfigDict


def expand_runs(sweep: ml_collections.ConfigDict, modes: Sequence[str]) -> list[SweepRun]:
  """Every run once per seed (runs outer, seeds inner), each config built and validated before
  anything runs, so that a bad override or reference fails at once."""
  runs = list(sweep.runs)
  if not runs:
    raise ConfigError(f'sweep {sweep.name!r} has no runs')
  slugs = [slug(r['name']) for r in runs]
  if len(set(slugs)) != len(slugs):
    raise ConfigError(f'sweep {sweep.name!r}: run names must be unique (as directories): {slugs}')
  seeds = tuple(sweep.get('seeds') or ())
  if any(not isinstance(s, int) or isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
    raise ConfigError(f'config.sweep.seeds={seeds!r}: expected distinct integers')
  expanded, models = [], {}
  for i, (run, run_slug) in enumerate(zip(runs, slugs)):
    for ref in ('init_from', 'convert_from'):
      if run.get(ref) and run[ref] not in [r['name'] for r in runs[:i]]:
        raise ConfigError(f'sweep {sweep.name!r} run {run["name"]!r}: {ref}={run[ref]!r} is not '
                          'the name of an earlier run')
      if run.get(ref) and 'train' not in modes:
        raise ConfigError(f'sweep {sweep.name!r} run {run["name"]!r}: {ref} needs training '
                          f'(config.sweep.modes={sweep.modes!r})')
    if run.get('convert_from'):
      try:  # the source is exported to Hugging Face T5 first: only a FiD layout can be
        convert.hf_config_from_fid(models[run['convert_from']])
      except convert.ConversionError as e:
        raise ConfigError(f'sweep {sweep.name!r} run {run["name"]!r}: convert_from='
                          f'{run["convert_from"]!r} cannot be exported to Hugging Face T5: {e}'
                          ) from e
    config = run_config(sweep, run, train='train' in modes)
    models[run['name']] = config.model
    for seed in seeds or (None,):
      seeded = ml_collections.ConfigDict(config.to_dict())
      if seed is not None:
        seeded.train.seed = seed
      expanded.append(SweepRun(run, seed, run_slug if seed is None else f'{run_slug}-seed{seed}',
                               seeded))
  return expanded


def _same_seed(runs: Sequence[SweepRun], name: str, seed: int | None) -> SweepRun:
  return next(r for r in runs if r.spec['name'] == name and r.seed == seed)


def export_hf(run_dir: str, model_config: ml_collections.ConfigDict) -> str:
  """The final parameters of the trained FiD in `run_dir`, as a Hugging Face T5.1.1 directory
  `run_dir/hf` (written once)."""
  hf_dir = os.path.join(run_dir, 'hf')
  if not os.path.isfile(os.path.join(hf_dir, 'config.json')):
    model = make_model(model_config)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    with checkpoint.Checkpointer(os.path.join(run_dir, 'checkpoints'), read_only=True) as ckpt:
      _, params = ckpt.restore_params_only(abstract)
    convert.save_hf_t5(jax.device_get(params), model_config, hf_dir)
  return hf_dir


def convert_start(hf_dir: str, config: ml_collections.ConfigDict, out_dir: str) -> dict[str, Any]:
  """Converts `hf_dir` to config.model into `out_dir` (written once) and points config.init at it
  (nothing to carry: a converted checkpoint has no optimizer state). Returns the report counts."""
  report_path = os.path.join(out_dir, convert_fido.REPORT_FILE)
  if not os.path.isfile(report_path):
    params, report = convert_fido.convert_to_fido(hf_dir, None, config.model,
                                                  cross_kv_init='random', seed=config.train.seed)
    convert_fido.write_fido_checkpoint(params, config.model, out_dir, report, config=config,
                                       seed=config.train.seed, overwrite=True)
  with open(report_path) as f:
    counts = json.load(f)['counts']
  config.init.update(checkpoint=out_dir, carry_second_moments=False)
  return counts


def run_sweep(config: ml_collections.ConfigDict, workdir: str | None = None, *,
              verbose: bool = True) -> list[dict[str, Any]]:
  """Runs (or resumes) `config.sweep` in `workdir` (default `config.sweep.workdir`); see above.

  Returns the results (one per run and seed; run.py prints `sweep_report.results_markdown` of
  them); `verbose` reports progress on stderr.
  """
  sweep = config.sweep
  workdir = workdir or sweep.workdir
  modes = parse_modes(sweep.modes)
  runs = expand_runs(sweep, modes)
  os.makedirs(os.path.join(workdir, 'runs'), exist_ok=True)
  if 'train' in modes and not jax.config.jax_compilation_cache_dir:
    # A run's seeds compile the same programs (the seed is an input): compile them once.
    jax.config.update('jax_compilation_cache_dir', os.path.join(workdir, 'jax_cache'))
  results, trained = [], {}   # trained: training fingerprint -> (run name, train result)
  benched = {}                # run name -> its bench fields (a benchmark does not depend on the seed)
  for i, run in enumerate(runs):
    start = time.perf_counter()
    spec, cfg = run.spec, run.config
    run_dir = os.path.join(workdir, 'runs', run.dir)
    if spec.get('init_from'):
      cfg.init.checkpoint = os.path.join(workdir, 'runs', _same_seed(runs, spec['init_from'], run.seed).dir)
    conversion = None
    if spec.get('convert_from'):
      source = _same_seed(runs, spec['convert_from'], run.seed)
      source_dir = os.path.join(workdir, 'runs', source.dir)
      conversion = (export_hf(source_dir, source.config.model), os.path.join(run_dir, 'converted'))
      cfg.init.update(checkpoint=conversion[1], carry_second_moments=False)
    config_json = _jsonable(cfg)
    result = _load_result(run_dir, config_json, modes)
    done = result is not None and all(m in result for m in modes)
    if result is None:
      result = json.loads(json.dumps(dict(  # plain JSON values, as a reloaded result has
          name=spec['name'], seed=run.seed, dir=run.dir, overrides=dict(spec.get('overrides', {})),
          paper=dict(spec.get('paper') or {}), group=spec.get('group', ''),
          series=spec.get('series', ''), x=spec.get('x'), config=config_json)))
    os.makedirs(run_dir, exist_ok=True)
    if 'bench' in modes and 'bench' not in result:
      if spec['name'] in benched:
        result.update(benched[spec['name']])
      else:
        result.update(_bench(sweep, spec, cfg))
      atomic_write(os.path.join(run_dir, 'result.json'), json.dumps(result, indent=1))
    if 'bench' in result:
      benched.setdefault(spec['name'], {k: result[k] for k in ('bench', 'max_batch') if k in result})
    fingerprint = json.dumps({s: config_json.get(s) for s in TRAIN_SECTIONS}, sort_keys=True)
    if 'train' in modes and 'train' not in result:
      if fingerprint in trained:   # e.g. Fig. 6: the points differ only in the bench workload
        shared_name, shared = trained[fingerprint]
        result['train'] = dict(shared, shared_with=shared_name)
      else:
        if conversion:
          result['conversion'] = convert_start(conversion[0], cfg, conversion[1])
        result['train'] = json.loads(json.dumps(train_lib.run_train(cfg, run_dir), default=float))
      result['config'] = config_json   # its bench sections were checked equal; now the train ones
      atomic_write(os.path.join(run_dir, 'result.json'), json.dumps(result, indent=1))
    if 'train' in result and 'shared_with' not in result['train']:
      trained.setdefault(fingerprint, (run.dir, result['train']))
    results.append(result)
    if verbose:  # progress, like training's bars: on stderr
      print(_progress_line(sweep.name, i + 1, len(runs), result, done,
                           time.perf_counter() - start), file=sys.stderr, flush=True)
  paths = sweep_report.write_reports(sweep, results, workdir)
  if verbose:
    print(f'wrote {", ".join(paths)}', file=sys.stderr, flush=True)
  return results


def _bench(sweep: ml_collections.ConfigDict, spec: Mapping[str, Any],
           cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The run's bench results (and max-batch search when the sweep asks for it)."""
  out, bench_cfg = {}, cfg
  if sweep.get('max_batch', False):   # "batch 64 or the largest that fits" (Table 3)
    largest = max(cfg.bench.batch_sizes)
    out['max_batch'] = max_batch.max_batch_search(cfg, start=largest, limit=largest)
    cap = out['max_batch']['max_batch']
    if not cap:
      raise RuntimeError(f'sweep {sweep.name!r} run {spec["name"]!r}: not even batch 1 fits '
                         f'({out["max_batch"]})')
    bench_cfg = ml_collections.ConfigDict(cfg.to_dict())
    bench_cfg.bench.batch_sizes = tuple(sorted({min(b, cap) for b in cfg.bench.batch_sizes}))
  out['bench'] = list(bench_lib.bench_model(bench_cfg))
  return out


def _progress_line(name: str, i: int, n: int, result: Mapping[str, Any], done: bool,
                   seconds: float) -> str:
  line = f'[sweep {name} {i}/{n}] {result["name"]}'
  if result.get('seed') is not None:
    line += f' (seed {result["seed"]})'
  if result.get('bench'):
    first = result['bench'][0]
    line += (f': encoder {first["encoder_ms"]:.3f} + decoder {first["decoder_ms"]:.3f} ms/sample '
             f'(batch {first["batch"]})')
  em = sweep_report.exact_match(result)
  if em is not None:
    line += f', EM {em:.3f}'
  return line + (' (done earlier)' if done else f' ({seconds:.1f} s)')
