"""--mode=predict (fido/predict.py): questions without answers or passages (passages from a
retrieval index), EM/F1 exactly as eval when answers exist, cross-attention scores in the files of
predict and eval."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fido import config as fido_config
from fido import eval_checkpoint, evaluate, experiment, predict, retrieve
from fido.checkpoint import Checkpointer
from fido.data.fid_format import read_fid_file
from fido.data.sources import resolve_data
from fido.errors import UserError
from fido.model.fid import init_params, make_model

LENGTHS = dict(n_passages=3, passage_len=48, target_len=6)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A config over small synthetic data, and a workdir holding a checkpoint of a tiny FiDO."""
  root = tmp_path_factory.mktemp('predict')
  config = experiment.default_config()
  config.data.update(dir=str(root / 'synthetic'), **LENGTHS)
  config.data.synthetic.update(n_train=40, n_dev=12, n_test=12, vocab_size=300)
  config.data = paths = resolve_data(config.data)
  config.model = fido_config.model_config('tiny', cross_attention_period=2, decoder_kv_heads=1,
                                          cross_kv_heads=1, vocab_size=512)
  config.predict.update(batch_size=8, progress=False)
  config.eval.update(batch_size=8, progress=False)
  params = jax.jit(lambda rng: init_params(make_model(config.model), rng))(jax.random.PRNGKey(0))
  workdir = str(root / 'run')
  with Checkpointer(os.path.join(workdir, 'checkpoints')) as ckpt:
    assert ckpt.save(5, dict(params=params, opt_state=None, step=jnp.asarray(5, jnp.int32),
                             rng=jax.random.PRNGKey(0)), config=config)
  return config, workdir, paths, root


def _lines(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_questions_without_answers_or_passages_get_passages_from_the_index(run):
  config, workdir, paths, root = run
  config = config.copy_and_resolve_references()
  config.retrieve.update(progress=False, top_k=5)
  retrieve.run_retrieve(config, str(root / 'retrieval'))  # the pooled synthetic passages
  questions = root / 'questions.jsonl'
  test = read_fid_file(paths.test)[0]
  questions.write_text(''.join(json.dumps({'question': r['question']}) + '\n' for r in test))
  config.predict.update(questions=str(questions))
  with pytest.raises(UserError, match='record 1 has no passages.*config.predict.index'):
    predict.run_predict(config, workdir)
  config.predict.index = str(root / 'retrieval')
  result = predict.run_predict(config, workdir)
  assert result['count'] == result['retrieved'] == len(test) and result['step'] == 5
  assert 'exact_match' not in result
  assert not os.path.exists(os.path.join(os.path.dirname(result['predictions']), 'metrics.json'))
  rows = _lines(result['predictions'])
  assert [r['question'] for r in rows] == [r['question'] for r in test]
  index = retrieve.load_index(config.predict.index)
  ids, _ = index.search([test[0]['question']], LENGTHS['n_passages'])
  assert [p['id'] for p in rows[0]['passages']] == [index.passage(i)['id'] for i in ids[0]]
  for row in rows:
    assert row['correct'] is None and row['f1'] is None and row['answers'] == []
    assert isinstance(row['prediction'], str) and row['sequence_score'] <= 0
    assert len(row['passages']) == LENGTHS['n_passages']
    assert sum(p['crossattention_score'] for p in row['passages']) == pytest.approx(1, abs=1e-4)


def test_em_and_f1_are_evals_when_answers_exist(run):
  config, workdir, paths, root = run
  config = config.copy_and_resolve_references()
  dev = read_fid_file(paths.dev)[0]
  config.predict.update(questions=paths.dev, crossattention_scores=False)
  first = predict.run_predict(config, workdir)  # the untrained model's answers...
  predicted = [r['prediction'] for r in _lines(first['predictions'])]
  assert sum(map(bool, predicted[::2])) >= 2  # some non-empty answers to match
  labeled = root / 'labeled.jsonl'  # ... made gold for every other question
  labeled.write_text(''.join(
      json.dumps(dict(question=r['question'], ctxs=r['ctxs'],
                      answers=[p + ' x' if i % 2 else p or 'x'])) + '\n'
      for i, (r, p) in enumerate(zip(dev, predicted))))
  config.predict.questions = str(labeled)
  result = predict.run_predict(config, workdir)
  records = read_fid_file(str(labeled))[0]
  model, params, _, tokenizer, _ = eval_checkpoint.restore_reader(config, workdir)
  metrics, rows = evaluate.evaluate_records(model, params, records, tokenizer, batch_size=8,
                                            progress=False, **LENGTHS)
  assert result['exact_match'] == metrics['exact_match'] and result['f1'] == metrics['f1']
  assert result['exact_match'] == pytest.approx(sum(1 for p in predicted[::2] if p) / len(dev))
  assert result['count'] == len(dev)
  with open(os.path.join(os.path.dirname(result['predictions']), 'metrics.json')) as f:
    assert json.load(f) == result
  assert [r['prediction'] for r in _lines(result['predictions'])] == [r['prediction'] for r in rows]
  assert 'crossattention_score' not in _lines(result['predictions'])[0]['passages'][0]
  assert 'top1_has_answer' not in result


def test_top1_has_answer_compares_the_retrievers_first_passage_with_the_most_attended():
  records = [dict(answers=['Paris'], ctxs=[dict(text='Lyon'), dict(text='in Paris')]),
             dict(answers=['Rome'], ctxs=[dict(text='Rome'), dict(text='Milan')]),
             dict(answers=[], ctxs=[dict(text='x')])]
  rows = [dict(passages=[dict(crossattention_score=s) for s in scores])
          for scores in ((0.2, 0.8), (0.3, 0.7), (1.0,))]
  assert predict.top1_has_answer(records, rows) == dict(retriever=0.5, crossattention=0.5)


def test_eval_writes_cross_attention_scores_next_to_each_passage(run):
  config, workdir, paths, _ = run
  config = config.copy_and_resolve_references()
  config.eval.crossattention_scores = True
  eval_checkpoint.evaluate_checkpoint(config, workdir, split_path=paths.dev, out_dir='')
  rows = _lines(os.path.join(workdir, 'eval_dev', 'predictions_step5.jsonl'))
  dev = read_fid_file(paths.dev)[0]
  assert [p['id'] for p in rows[0]['passages']] == [c['id'] for c in dev[0]['ctxs']]
  scores = np.asarray([[p['crossattention_score'] for p in r['passages']] for r in rows])
  np.testing.assert_allclose(scores.sum(axis=1), 1, atol=1e-4)
  assert len(np.unique(scores.round(4))) > len(rows)  # not a constant
