"""The user-error contract through `run.py` itself: a user's mistake exits with status 2 and one
`error:` line on stderr naming the culprit, never a traceback (fido.cli, fido.errors)."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fido import cli
from fido.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = '--config=experiments/embedded.py:fido,smoke'


class ForkServer:
  """Runs `python run.py ARGV` in children forked from tests/forked_run.py (one import in all)."""

  def __init__(self, workdir: pathlib.Path):
    self.workdir, self.count = workdir, 0
    self.process = subprocess.Popen(
        [sys.executable, str(REPO / 'tests' / 'forked_run.py')], cwd=REPO, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(REPO)})

  def run(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    self.count += 1
    out, err = (self.workdir / f'{self.count}.{name}' for name in ('out', 'err'))
    request = dict(argv=list(args), stdout=str(out), stderr=str(err), env=env or {})
    self.process.stdin.write(json.dumps(request) + '\n')
    self.process.stdin.flush()
    status = json.loads(self.process.stdout.readline())['status']
    return subprocess.CompletedProcess(args, status, out.read_text(), err.read_text())

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait(timeout=60)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  server = ForkServer(tmp_path_factory.mktemp('forked'))
  yield server
  server.close()


@pytest.fixture
def run_py(server):
  return server.run


def assert_user_error(result: subprocess.CompletedProcess, *culprits: str) -> str:
  """Exit status 2, no traceback, and one `error:` line (the first not a logged warning) that
  names every culprit."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, result.stderr[-3000:]
  for culprit in culprits:
    assert culprit in errors[0], (culprit, errors[0])
  return errors[0]


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, str]:
  """The smoke synthetic data (tokenizer, train/dev/test) and a few damaged copies of it."""
  root = tmp_path_factory.mktemp('cli')
  data = sources.default_data_config()
  data.update(dir=str(root / 'synthetic'), n_passages=10)
  data.synthetic.update(n_train=64, n_dev=16, n_test=16)
  data = sources.resolve_data(data)
  lines = pathlib.Path(data.train).read_text().splitlines()
  record = json.loads(lines[0])

  def write(name: str, text: str | bytes) -> str:
    path = root / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)

  gz = gzip.compress('\n'.join(lines).encode())
  return dict(
      tokenizer=data.tokenizer, train=data.train, dev=data.dev, test=data.test, root=str(root),
      malformed=write('malformed.jsonl', lines[0] + '\n{"question": "q", \n' + lines[1]),
      empty=write('empty.jsonl', ''),
      no_passages=write('no_passages.jsonl', json.dumps({**record, 'ctxs': []}) + '\n'),
      answers_str=write('answers_str.jsonl', json.dumps({**record, 'answers': 7}) + '\n'),
      broken_gz=write('broken.jsonl.gz', gz[:len(gz) // 2] + b'\x00' * 64 + gz[len(gz) // 2:]),
      latin1=write('latin1.jsonl', lines[0].encode() + b'\n{"question": "caf\xe9"}\n'),
      few=write('few.jsonl', '\n'.join(lines[:3])),
      long_question=write('long.jsonl', json.dumps(
          {**record, 'question': ' '.join(['why'] * 40) + '?'}) + '\n'),
      array=write('array.json', '[' + ',\n'.join(lines[:2]) + ',\n{"question": ]'),
      not_spm=write('not_spm.model', 'this is not a SentencePiece model'),
      a_file=write('a_file', 'not a directory'),
      foreign_ckpt=str(root / 'foreign'),
      psgs_no_header=write('psgs.tsv', '1\tsome text\tTitle\n'),
      qas_bad=write('qas.csv', "who?\t['a']\nwhy?\tnot a list\n"),
      questions_only=write('questions.jsonl', json.dumps({'question': record['question']}) + '\n'),
  )


def own_data(files, train='train', dev='dev', test='test', **extra) -> list[str]:
  flags = [SMOKE, '--config.data.source=files', f'--config.data.tokenizer={files["tokenizer"]}',
           f'--config.data.train={files[train]}', f'--config.data.dev={files[dev]}',
           f'--config.data.test={files[test]}']
  return flags + [f'--config.{k}={v}' for k, v in extra.items()]


# (name, args (a function of the files fixture), substrings the error line must hold)
CASES = [
    ('misspelled field', lambda f: ['--config.train.stpes=10'], ["config.train.stpes", "'steps'"]),
    ('misspelled section', lambda f: ['--config.modle.vocab_size=3'], ['config.modle', "'model'"]),
    ('missing config file', lambda f: ['--config=experiments/fidoo.py:small'],
     ['experiments/fidoo.py', 'experiments/fido.py']),
    ('unknown variant', lambda f: ['--config=experiments/fido.py:basexl'], ["'basexl'", 'base-xl']),
    ('unknown config argument', lambda f: ['--config=experiments/fido.py:base-xl,lsaa=3'],
     ["'lsaa'", "'lsa'"]),
    ('config argument of the wrong type', lambda f: ['--config=experiments/fid.py:tiny,lsa=x'],
     ['lsa', "'x'"]),
    ('field value of the wrong type', lambda f: ['--config.train.steps=abc'],
     ['--config.train.steps']),
    ('unknown mode', lambda f: ['--mode=fit'], ['--mode']),
    ('unknown flag', lambda f: ['--wokdir=/tmp/x'], ["'wokdir'", "'workdir'"]),
    ('positional argument', lambda f: ['train'], ["['train']"]),
    ('unknown device', lambda f: ['--mode=analyze', '--device=tpu-v5'], ['--device', 'tpu-v4']),
    ('unknown bench setting',
     lambda f: ['--mode=bench', '--config=experiments/fido.py:tiny,bench=gpu'], ["'gpu'"]),
    ('impossible model', lambda f: [SMOKE, '--config.model.decoder.cross_attention_period=9'],
     ['config.model.decoder.cross_attention_period']),
    ('unknown decoder weight format', lambda f: [SMOKE, '--config.model.decoder_weights=int4'],
     ['config.model.decoder_weights', "'int4'"]),
    ('training with int8 decoder weights', lambda f: [SMOKE, '--config.model.decoder_weights=int8'],
     ['config.model.decoder_weights', 'inference']),
    ('unknown bench reference', lambda f: ['--mode=bench', '--config=experiments/fid.py:tiny,smoke',
                                           '--config.bench.reference=ct3'],
     ['config.bench.reference', "'ct3'", 'ct2']),
    ('unknown optimizer', lambda f: [SMOKE, '--config.optimizer.name=sgd'],
     ['config.optimizer.name']),
    ('unknown task', lambda f: [SMOKE, '--config.train.task=distill'], ['config.train.task']),
    ('unknown on_error', lambda f: [SMOKE, '--config.data.on_error=ignore'],
     ['config.data.on_error']),
    ('unknown data source', lambda f: [SMOKE, '--config.data.source=web'], ['config.data.source']),
    ('vocabulary too small', lambda f: [SMOKE, '--config.model.vocab_size=128'],
     ['config.model.vocab_size']),
    ('batch not divisible', lambda f: [SMOKE, '--config.train.gradient_accumulation_steps=3'],
     ['gradient_accumulation_steps']),
    ('own data without tokenizer', lambda f: [a for a in own_data(f) if 'tokenizer' not in a],
     ['config.data.tokenizer']),
    ('missing tokenizer', lambda f: own_data(f) + ['--config.data.tokenizer=/nonexistent/sp.model'],
     ['/nonexistent/sp.model']),
    ('tokenizer not SentencePiece', lambda f: own_data(f) + [
        f'--config.data.tokenizer={f["not_spm"]}'], ['not_spm.model']),
    ('missing train file', lambda f: own_data(f) + ['--config.data.train=/nonexistent/train.jsonl'],
     ['/nonexistent/train.jsonl']),
    ('malformed JSON line', lambda f: own_data(f, train='malformed'),
     ['malformed.jsonl', 'line 2']),
    ('malformed JSON array', lambda f: own_data(f, train='array'), ['array.json', 'line 3']),
    ('empty file', lambda f: own_data(f, train='empty'), ['empty.jsonl', 'empty']),
    ('record without passages', lambda f: own_data(f, train='no_passages'),
     ['no_passages.jsonl', 'line 1', 'ctxs']),
    ('answers of the wrong type', lambda f: own_data(f, train='answers_str'),
     ['answers_str.jsonl', 'answers']),
    ('gzip damaged mid-stream', lambda f: own_data(f, train='broken_gz'), ['broken.jsonl.gz']),
    ('not UTF-8', lambda f: own_data(f, train='latin1'), ['latin1.jsonl', 'line 2', 'UTF-8']),
    ('fewer records than a batch', lambda f: own_data(f, train='few'),
     ['few.jsonl', 'config.train.batch_size=']),
    ('question longer than passage_len', lambda f: own_data(f, dev='long_question'),
     ['long.jsonl', 'question', 'passage_len']),
    ('eval of a workdir without checkpoints', lambda f: ['--mode=eval', SMOKE],
     ['no checkpoint', 'run']),
    ('eval of a missing workdir', lambda f: ['--mode=eval', SMOKE, '--workdir=/nonexistent/run'],
     ['/nonexistent/run']),
    ('eval of a foreign checkpoint', lambda f: ['--mode=eval', SMOKE,
                                                f'--workdir={f["foreign_ckpt"]}'],
     ['foreign']),
    ('eval with the deprecated checkpoint field and --workdir',
     lambda f: ['--mode=eval', SMOKE, '--config.eval.checkpoint=/old/run'],
     ['config.eval.checkpoint', '--workdir']),
    ('workdir inside a file', lambda f: [SMOKE, f'--workdir={f["a_file"]}/run'], ['a_file']),
    ('unknown sweep', lambda f: ['--mode=sweep', '--config=experiments/quality.py:robustnes'],
     ["'robustnes'", "'robustness'"]),
    ('retrieve from a missing corpus', lambda f: [
        '--mode=retrieve', '--config.retrieve.corpus=/nonexistent/psgs.tsv',
        f'--config.retrieve.questions={f["test"]}'], ['/nonexistent/psgs.tsv']),
    ('retrieve from a DPR tsv without its header', lambda f: [
        '--mode=retrieve', f'--config.retrieve.corpus={f["psgs_no_header"]}',
        f'--config.retrieve.questions={f["test"]}'], ['psgs.tsv', 'line 1', 'header']),
    ('retrieve for DPR qas with answers that are not a list', lambda f: [
        '--mode=retrieve', f'--config.retrieve.corpus={f["psgs_no_header"]}',
        f'--config.retrieve.questions={f["qas_bad"]}'], ['qas.csv', 'line 2', 'list']),
    ('predict for questions without passages and no index', lambda f: [
        '--mode=predict', SMOKE, f'--config.predict.questions={f["questions_only"]}'],
     ['questions.jsonl', 'no passages', 'config.predict.index']),
    ('predict with an index that is not there', lambda f: [
        '--mode=predict', SMOKE, f'--config.predict.questions={f["questions_only"]}',
        '--config.predict.index=/nonexistent/retrieval'], ['/nonexistent/retrieval', 'retrieve']),
    ('predict without a checkpoint', lambda f: ['--mode=predict', SMOKE], ['no checkpoint']),
    ('tfds data set not prepared', lambda f: own_data(f, **{
        'data.source': 'tfds', 'data.tfds.name': 'nq', 'data.tfds.dir': f['root'] + '/tfds'}),
     ["no prepared dataset 'fid_qa/nq'", '--mode=prepare']),
    ('tfds source without a name', lambda f: own_data(f, **{'data.source': 'tfds'}),
     ['config.data.tfds.name']),
    ('prepare without a name', lambda f: ['--mode=prepare'] + own_data(f),
     ['config.data.tfds.name']),
    ('prepare a missing file', lambda f: ['--mode=prepare'] + own_data(f, **{
        'data.train': '/nonexistent/train.jsonl', 'data.tfds.name': 'x',
        'data.tfds.dir': f['root'] + '/tfds'}), ['/nonexistent/train.jsonl']),
    ('prepare a malformed file', lambda f: ['--mode=prepare'] + own_data(f, train='malformed', **{
        'data.tfds.name': 'bad', 'data.tfds.dir': f['root'] + '/tfds'}),
     ['malformed.jsonl', 'line 2']),
]


@pytest.mark.parametrize('args, culprits', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_line_and_exit_status_2(run_py, files, tmp_path, args, culprits):
  foreign = pathlib.Path(files['foreign_ckpt'])
  (foreign / 'checkpoints' / '3').mkdir(parents=True, exist_ok=True)
  (foreign / 'checkpoints' / '3' / 'params').write_text('not a checkpoint')
  argv = args(files)
  if not any(a.startswith('--workdir') for a in argv):
    argv.append(f'--workdir={tmp_path / "run"}')
  if SMOKE in argv and not any(a.startswith('--config.data.') for a in argv):
    argv.append(f'--config.data.dir={files["root"]}/smoke')  # not the repository's data/
  assert_user_error(run_py(*argv), *culprits)


def test_prepare_is_idempotent_and_refuses_other_files_under_its_name(run_py, files, tmp_path):
  prepare = ['--mode=prepare'] + own_data(files, **{'data.tfds.name': 'smoke',
                                                    'data.tfds.dir': str(tmp_path / 'tfds')})
  first = run_py(*prepare)
  assert first.returncode == 0, first.stderr[-3000:]
  result = json.loads(first.stdout.splitlines()[-1])
  assert result['fid']['records'] == {'train': 64, 'dev': 16, 'test': 16}
  assert not result['fid']['already_prepared'] and 'preparing fid_qa/smoke train' in first.stderr
  again = json.loads(run_py(*prepare).stdout.splitlines()[-1])
  assert again['fid']['already_prepared'] and again['fid']['records'] == result['fid']['records']
  other = run_py(*prepare, f'--config.data.test={files["dev"]}')
  assert_user_error(other, str(tmp_path / 'tfds' / 'fid_qa' / 'smoke'), 'prepared from',
                    'config.data.tfds.name')


def test_different_run_in_workdir_is_refused_and_left_intact(run_py, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'model': {'vocab_size': 1}}))
  assert_user_error(run_py(SMOKE, f'--workdir={workdir}'), str(workdir), '--overwrite')
  assert json.loads((workdir / 'config.json').read_text()) == {'model': {'vocab_size': 1}}


def test_traceback_on_request(run_py):
  result = run_py('--config.train.stpes=10', env={'FIDO_TRACEBACK': '1'})
  assert result.returncode == 2 and 'Traceback' in result.stderr and 'error: ' in result.stderr


def test_help_lists_modes_config_files_and_variants(run_py):
  result = run_py('--help')
  assert result.returncode == 0, result.stderr
  for mode in cli.MODES:
    assert f'  {mode} ' in result.stdout
  for path in (REPO / 'experiments').glob('*.py'):
    assert f'experiments/{path.name}' in result.stdout
  assert 'base-xl' in result.stdout and '--mode=show_config' in result.stdout


def test_show_config_prints_the_resolved_config_with_overrides(run_py):
  result = run_py('--mode=show_config', '--config=experiments/fid.py:tiny',
                  '--config.train.steps=7')
  assert result.returncode == 0, result.stderr
  assert 'steps: 7' in result.stdout and 'cross_attention_period: 1' in result.stdout


def test_describe_leaves_bugs_to_their_traceback():
  assert cli.describe(KeyError('x')) is None and cli.describe(ValueError('x')) is None
  assert cli.describe(KeyError('x')) is None and cli.describe(ValueError('x')) is None
  assert cli.describe(PermissionError(13, 'Permission denied', '/x')) == '/x: Permission denied'
  assert cli.describe(FileNotFoundError('no filename')) is None
