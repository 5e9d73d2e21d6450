"""Synthetic retrieval QA: the embedded default data set and a test bed.

Invented places (entities) are asked about their attributes (capital, founder, ...). A question asks
for one attribute of one entity; its answer (a multi-token invented string) appears in exactly one
of the example's passages. The other passages are distractors: other attributes of the same entity
and the same attribute of other entities. Every example draws fresh entity names and values (each
record is its own small world of unique invented phrases), so an answer never occurs in another
passage or record and dev/test entities are never seen in training: the model must learn to match
the question's entity to a passage title and copy; memorizing names or facts cannot help. answer_position='late' puts the fact
after the filler sentences of its passage (FiD-Light, which keeps only the first tokens of each
passage, is then at a disadvantage, as the FiDO paper found). Everything is a function of the seed.

prepare_synthetic(out_dir) writes the whole embedded default: FiD JSONL train/dev/test, a corpus
(one document per line: each *training* record's question and passages, for pre-training and for
the tokenizer) and a SentencePiece tokenizer trained on that corpus.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile

import numpy as np

from fido.data import tokenizer as tokenizer_lib

FORMAT_VERSION = 5
ANSWER_POSITIONS = ("early", "late")
MAX_CORPUS_DOCUMENTS = 5000

# (attribute, question template, fact template); {e} = entity, {v} = value.
ATTRIBUTES = (
    ("capital", "What is the capital of {e}?", "The capital of {e} is {v}."),
    ("founder", "Who founded {e}?", "{e} was founded by {v}."),
    ("river", "Which river flows through {e}?", "The river {v} flows through {e}."),
    ("language", "What language is spoken in {e}?", "Most people in {e} speak {v}."),
    ("festival", "Which festival is held in {e}?", "Each spring {e} holds the {v} festival."),
    ("export", "What is the main export of {e}?", "The main export of {e} is {v}."),
    ("mountain", "What is the highest mountain in {e}?", "The highest peak in {e} is {v}."),
    ("currency", "What currency is used in {e}?", "Traders in {e} pay with the {v}."),
)
FILLERS = (
    "{e} lies in a quiet valley.", "Visitors often call {e} a friendly place.",
    "{e} has a long history of trade.", "Many old stories are told about {e}.",
    "The winters in {e} are mild.", "Farmers in {e} grow grain and fruit.",
    "A small museum in {e} opened last year.", "Roads to {e} are busy in summer.",
)
_SYLLABLES = tuple(o + v + c for o in "bdfgklmnprstvz" for v in "aeiou"
                   for c in ("", "n", "r", "s"))


class _Words:
  """Draws invented two-word phrases ("Ban Torsi"), each phrase unique, no word a template word.

  280 syllables, words of 1-2 of them: a ~1k-piece tokenizer learns the syllables, so a phrase is
  2-4 tokens. Phrases (names and values) are unique and always followed by a template word or ".",
  so a value occurs as a whole-word sequence only where it is stated.
  """

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self.template_words = {w.lower() for t in ATTRIBUTES + (FILLERS,) for s in t
                           for w in re.findall(r"\w+", s)}
    self.used = set()

  def word(self) -> str:
    while True:
      n = 1 + int(self.rng.random() < 0.4)
      w = "".join(_SYLLABLES[i] for i in self.rng.integers(len(_SYLLABLES), size=n))
      if w not in self.template_words:
        return w.capitalize()

  def phrase(self) -> str:
    while True:
      p = f"{self.word()} {self.word()}"
      if p not in self.used:
        self.used.add(p)
        return p


def make_entities(words: _Words, n: int) -> list[dict]:
  """n entities: {'name': 'Dravo Keth', 'capital': 'Somun Vel', ...} (unique invented phrases)."""
  return [{"name": words.phrase(), **{a: words.phrase() for a, _, _ in ATTRIBUTES}}
          for _ in range(n)]


def _fact(entity: dict, attribute: str) -> str:
  template = next(f for a, _, f in ATTRIBUTES if a == attribute)
  return template.format(e=entity["name"], v=entity[attribute])


def _passage(entity: dict, attribute: str, rng: np.random.Generator, answer_position: str) -> dict:
  fillers = [FILLERS[i].format(e=entity["name"]) for i in rng.permutation(len(FILLERS))[:2]]
  fact = _fact(entity, attribute)
  sentences = fillers + [fact] if answer_position == "late" else [fact] + fillers[:1]
  return {"title": entity["name"], "text": " ".join(sentences)}


def make_example(entities: list[dict], entity_index: int, attribute: str, n_passages: int,
                 rng: np.random.Generator, answer_position: str = "early",
                 words: _Words | None = None) -> dict:
  """One FiD record: the gold passage and distractors, shuffled, with decreasing scores.

  With `words`, every value this record states is drawn afresh (its own world); else the entities'.
  """
  entity = entities[entity_index]
  others = [a for a, _, _ in ATTRIBUTES if a != attribute]
  # Each distractor shares the entity (p=0.4) or the attribute: with any number of passages,
  # the gold passage can only be told apart by matching both.
  n_same_entity = min(int(rng.binomial(n_passages - 1, 0.4)), len(others))
  n_same_attribute = n_passages - 1 - n_same_entity
  if n_same_attribute > len(entities) - 1:
    raise ValueError(f"{len(entities)} entities are too few for {n_passages} passages")
  passages = [(entity, attribute)]
  passages += [(entity, others[i]) for i in rng.permutation(len(others))[:n_same_entity]]
  candidates = rng.choice(len(entities), size=n_same_attribute + 1, replace=False)
  other_entities = [int(i) for i in candidates if i != entity_index][:n_same_attribute]
  passages += [(entities[i], attribute) for i in other_entities]
  if words is not None:  # copies of the entities, with this record's own names and values
    copies = {}
    passages = [(copies.setdefault(id(e), dict(e)), a) for e, a in passages]
    for e in copies.values():
      e['name'] = words.phrase()
    for e, a in passages:
      e[a] = words.phrase()
    entity = passages[0][0]
  order = rng.permutation(len(passages))
  scores = np.sort(rng.uniform(60.0, 90.0, len(passages)))[::-1]
  ctxs = []
  for rank, i in enumerate(order):
    e, a = passages[i]
    ctxs.append({**_passage(e, a, rng, answer_position), "score": round(float(scores[rank]), 3),
                 "id": f"{e['name']}/{a}"})
  question = next(q for a, q, _ in ATTRIBUTES if a == attribute).format(e=entity["name"])
  return {"question": question, "answers": [entity[attribute]], "ctxs": ctxs}


def make_split(entities: list[dict], n_examples: int, n_passages: int, rng: np.random.Generator,
               answer_position: str = "early", words: _Words | None = None) -> list[dict]:
  """n_examples records over distinct (entity, attribute) pairs of `entities` (fresh values per
  record when `words` is given)."""
  pairs = len(entities) * len(ATTRIBUTES)
  if n_examples > pairs:
    raise ValueError(f"{n_examples} examples need more than {len(entities)} entities")
  chosen = rng.permutation(pairs)[:n_examples]
  return [make_example(entities, int(p) // len(ATTRIBUTES), ATTRIBUTES[int(p) % len(ATTRIBUTES)][0],
                       n_passages, rng, answer_position, words) for p in chosen]


def corpus_documents(records: list[dict]) -> list[str]:
  """One document per training record, in the FiD input format so the tokenizer learns its
  keywords: "question: {q} title: {t1} context: {c1} title: {t2} context: {c2} ..."."""
  return [" ".join([f"question: {r['question']}"] +
                   [f"title: {c['title']} context: {c['text']}" for c in r["ctxs"]])
          for r in records]


def generate(seed: int = 0, n_train: int = 3000, n_dev: int = 300, n_test: int = 300,
             n_passages: int = 10, answer_position: str = "early") -> dict[str, list]:
  """In-memory data set: {'train', 'dev', 'test': FiD records, 'corpus': documents}."""
  if answer_position not in ANSWER_POSITIONS:
    raise ValueError(f"answer_position must be one of {ANSWER_POSITIONS}, got {answer_position!r}")
  rng = np.random.default_rng(seed)
  words = _Words(rng)
  per_entity = len(ATTRIBUTES) // 2  # questions per entity, on average
  out = {}
  for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
    entities = make_entities(words, max(-(-n // per_entity), n_passages))
    out[split] = make_split(entities, n, n_passages, rng, answer_position, words)
    if split == "train":  # enough text for the tokenizer and brief pre-training
      out["corpus"] = corpus_documents(out["train"][:MAX_CORPUS_DOCUMENTS])
  return out


@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
  train: str
  dev: str
  test: str
  corpus: str
  tokenizer: str
  manifest: str


def _atomic_write(path: str, lines: list[str]) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.writelines(line + "\n" for line in lines)
  os.replace(tmp, path)


def prepare_synthetic(out_dir: str | os.PathLike, seed: int = 0, *, n_train: int = 3000,
                      n_dev: int = 300, n_test: int = 300, n_passages: int = 10,
                      answer_position: str = "early", vocab_size: int = 1000) -> SyntheticPaths:
  """Writes train/dev/test.jsonl, corpus.txt, spiece.model and manifest.json into out_dir.

  Idempotent: if manifest.json holds the same parameters and every file exists, nothing is written.
  vocab_size is the number of SentencePiece pieces (model vocab: +100 sentinels, rounded to 128).
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  params = dict(version=FORMAT_VERSION, seed=seed, n_train=n_train, n_dev=n_dev, n_test=n_test,
                n_passages=n_passages, answer_position=answer_position, vocab_size=vocab_size)
  paths = SyntheticPaths(**{k: os.path.join(out_dir, f) for k, f in (
      ("train", "train.jsonl"), ("dev", "dev.jsonl"), ("test", "test.jsonl"),
      ("corpus", "corpus.txt"), ("tokenizer", "spiece.model"), ("manifest", "manifest.json"))})
  if _is_prepared(paths, params):
    return paths
  data = generate(seed, n_train, n_dev, n_test, n_passages, answer_position)
  for split in ("train", "dev", "test"):
    _atomic_write(getattr(paths, split), [json.dumps(r) for r in data[split]])
  _atomic_write(paths.corpus, data["corpus"])
  tmp_prefix = os.path.join(out_dir, ".tmp-spiece")
  # BPE: sentencepiece's unigram trainer splits even frequent words ("question") into letters on
  # this corpus of many rare invented names; BPE learns the English words and syllable pieces.
  tokenizer_lib.train_tokenizer(paths.corpus, tmp_prefix, vocab_size, model_type="bpe")
  os.replace(tmp_prefix + ".model", paths.tokenizer)
  os.replace(tmp_prefix + ".vocab", paths.tokenizer[:-len(".model")] + ".vocab")
  _atomic_write(paths.manifest, [json.dumps(params, sort_keys=True)])
  return paths


def _is_prepared(paths: SyntheticPaths, params: dict) -> bool:
  if not all(os.path.isfile(p) for p in dataclasses.astuple(paths)):
    return False
  try:
    with open(paths.manifest, encoding="utf-8") as f:
      return json.load(f) == params
  except (OSError, ValueError):
    return False
