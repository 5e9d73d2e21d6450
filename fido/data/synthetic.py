"""Synthetic retrieval QA: the embedded default data set and a test bed.

Each record is its own small world of invented places (entities) and their attributes (capital,
founder, ...). The question asks for one attribute of one entity; its answer (an invented two-word
phrase) is stated in exactly one of the record's passages. The passages are a grid: r entities
x c attributes (c drawn per record from 2..min(MAX_ATTRIBUTES_PER_RECORD, P // 2), r = ceil(P / c),
fewer than c cells dropped, never the gold one, nor all distractors of one kind), one fact per
passage. Every entity and every attribute therefore occurs about equally often, so neither
counting titles nor counting facts finds the gold passage: only matching the question's
entity against the passage title *and* its attribute against the fact does (a distractor shares
the entity, the attribute, or neither).

Names and values are fresh per record (no fact recurs, so memorising cannot help) and come from
disjoint parts of the phrase space per split: no dev/test entity or answer occurs in training.
Phrases are two one-syllable words ("Ban Tor"): the ~600-piece tokenizer learns every syllable, so
names and answers are exactly two tokens, and short passages keep a CPU training step cheap.

answer_position='early' (the default) makes a passage the fact alone; 'late' puts two filler
sentences before it, so that the answer lies beyond the first tokens of its passage (FiD-Light,
which keeps only those, is then at a disadvantage, as the FiDO paper found). Everything is a
function of the seed.

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
import time
from typing import Callable

import numpy as np

from fido.data import tokenizer as tokenizer_lib
from fido.files import atomic_write

FORMAT_VERSION = 6
ANSWER_POSITIONS = ("early", "late")
SPLITS = ("train", "dev", "test")
MAX_CORPUS_DOCUMENTS = 5000
MAX_ATTRIBUTES_PER_RECORD = 3

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
_TEMPLATE_WORDS = frozenset(w.lower() for group in (ATTRIBUTES, (FILLERS,)) for t in group
                            for s in t for w in re.findall(r"\w+", s))
# One-syllable words (consonant, vowel, optional coda) that no template uses: 279 of them.
WORDS = tuple(w.capitalize() for w in (o + v + c for o in "bdfgklmnprstvz" for v in "aeiou"
                                       for c in ("", "n", "r", "s"))
              if w not in _TEMPLATE_WORDS)
# Share of the phrase space (len(WORDS)**2 two-word phrases) of each split, by a fixed hash.
_SPLIT_TENTHS = {"train": range(0, 8), "dev": range(8, 9), "test": range(9, 10)}


def split_phrases(split: str) -> np.ndarray:
  """Indices of the two-word phrases that `split` may use (disjoint across splits). int64 [N]."""
  index = np.arange(len(WORDS) ** 2, dtype=np.int64)
  tenth = (index * 2654435761) % 2**32 % 10  # Knuth's multiplicative hash: splits interleave
  return index[np.isin(tenth, _SPLIT_TENTHS[split])]


def phrase(index: int) -> str:
  return f"{WORDS[index // len(WORDS)]} {WORDS[index % len(WORDS)]}"


def _distinct(rng: np.random.Generator, phrases: np.ndarray, n: int) -> list[str]:
  """n distinct phrases drawn from `phrases` (rejection: collisions are rare)."""
  while True:
    chosen = phrases[rng.integers(len(phrases), size=n)].tolist()
    if len(set(chosen)) == n:
      return [phrase(i) for i in chosen]


def make_example(rng: np.random.Generator, phrases: np.ndarray, n_passages: int,
                 answer_position: str = "early") -> dict:
  """One FiD record: a grid of r entities x c attributes holding the gold (entity 0, attribute 0),
  passages in decreasing order of a simulated retrieval score. `phrases`: split_phrases(split)."""
  # Two or three attributes (at most P // 2: two entities or more), so most distractors share the
  # question's attribute and only the entity match tells them apart.
  most = min(MAX_ATTRIBUTES_PER_RECORD, max(1, n_passages // 2))
  n_attributes = int(rng.integers(min(2, most), most + 1))
  n_entities = -(-n_passages // n_attributes)
  attributes = rng.permutation(len(ATTRIBUTES))[:n_attributes].tolist()
  words = _distinct(rng, phrases, n_entities * (1 + n_attributes))
  names, values = words[:n_entities], words[n_entities:]
  cells = n_entities * n_attributes  # cell i: entity i // n_attributes, attribute i % n_attributes
  # Always kept: the gold cell, one of its entity's other facts (cell 1) and its attribute for
  # another entity (cell n_attributes), so that every record needs both matches.
  kept = [0] + [1] * (n_attributes > 1) + [n_attributes] * (n_entities > 1)
  rest = [i for i in range(cells) if i not in kept]
  kept += [rest[i] for i in rng.permutation(len(rest))[:n_passages - len(kept)].tolist()]
  # A retriever's scores: sharing the question's entity or attribute scores higher (as words in
  # common do for BM25), plus noise, so the gold passage is often but not always ranked first.
  shares = [(cell < n_attributes) + (cell % n_attributes == 0) for cell in kept]
  scores = (60.0 + 10.0 * np.asarray(shares) + rng.uniform(0.0, 15.0, n_passages)).round(3)
  fillers = rng.permutation(len(FILLERS))[:2].tolist() if answer_position == "late" else []
  ctxs = []
  for i in np.argsort(-scores, kind="stable").tolist():
    cell = kept[i]
    entity = names[cell // n_attributes]
    attribute, _, fact = ATTRIBUTES[attributes[cell % n_attributes]]
    text = fact.format(e=entity, v=values[cell])
    if fillers:
      text = " ".join([FILLERS[f].format(e=entity) for f in fillers] + [text])
    ctxs.append({"title": entity, "text": text, "score": float(scores[i]), "id": f"{entity}/{attribute}"})
  question = ATTRIBUTES[attributes[0]][1].format(e=names[0])
  return {"question": question, "answers": [values[0]], "ctxs": ctxs}


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
  if n_passages < 1:
    raise ValueError(f"n_passages must be >= 1, got {n_passages}")
  rng = np.random.default_rng(seed)
  out = {}
  for split, n in zip(SPLITS, (n_train, n_dev, n_test)):
    phrases = split_phrases(split)
    out[split] = [make_example(rng, phrases, n_passages, answer_position) for _ in range(n)]
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


def prepare_synthetic(out_dir: str | os.PathLike, seed: int = 0, *, n_train: int = 3000,
                      n_dev: int = 300, n_test: int = 300, n_passages: int = 10,
                      answer_position: str = "early", vocab_size: int = 600,
                      announce: Callable[[str], None] | None = None) -> SyntheticPaths:
  """Writes train/dev/test.jsonl, corpus.txt, spiece.model and manifest.json into out_dir.

  Idempotent: if manifest.json holds the same parameters and every file exists, nothing is written.
  vocab_size is the number of SentencePiece pieces (model vocab: +100 sentinels, rounded to 128).
  `announce` (e.g. print) is told when generation starts and ends, with its duration.
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
  start = time.perf_counter()
  if announce:
    announce(f"generating synthetic data ({n_train} train, {n_dev} dev, {n_test} test records) and "
             f"its tokenizer in {out_dir}")
  data = generate(seed, n_train, n_dev, n_test, n_passages, answer_position)
  for split in SPLITS:
    atomic_write(getattr(paths, split), "".join(json.dumps(r) + "\n" for r in data[split]))
  atomic_write(paths.corpus, "".join(line + "\n" for line in data["corpus"]))
  # A private temporary name: two processes may prepare the same directory at once (identical
  # results, as everything is a function of the seed).
  tmp_dir = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-spiece-")
  tmp_prefix = os.path.join(tmp_dir, "spiece")
  # BPE: sentencepiece's unigram trainer splits even frequent words ("question") into letters on
  # this corpus of many rare invented names; BPE learns the English words and every syllable.
  tokenizer_lib.train_tokenizer(paths.corpus, tmp_prefix, vocab_size, model_type="bpe")
  os.replace(tmp_prefix + ".model", paths.tokenizer)
  os.replace(tmp_prefix + ".vocab", paths.tokenizer[:-len(".model")] + ".vocab")
  os.rmdir(tmp_dir)
  atomic_write(paths.manifest, json.dumps(params, sort_keys=True) + "\n")
  if announce:
    announce(f"generated {out_dir} in {time.perf_counter() - start:.1f} s")
  return paths


def _is_prepared(paths: SyntheticPaths, params: dict) -> bool:
  if not all(os.path.isfile(p) for p in dataclasses.astuple(paths)):
    return False
  try:
    with open(paths.manifest, encoding="utf-8") as f:
      return json.load(f) == params
  except (OSError, ValueError):
    return False
