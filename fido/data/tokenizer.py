"""SentencePiece tokenizer with T5's conventions.

T5 conventions (kept exactly, so T5's `spiece.model` works as-is):
  - pad 0, EOS 1, unk 2 (no BOS). The SentencePiece model itself must define these ids.
  - 100 sentinels on top of the SentencePiece pieces, counting down from the top:
    `<extra_id_i>` = pieces + 100 - 1 - i
    (T5: 32000 pieces -> `<extra_id_0>` = 32099, `<extra_id_99>` = 32000).
  - the model vocabulary (embedding rows) is pieces + 100 rounded up to a multiple of 128
    (T5: 32128);
    ids above the last sentinel are never produced.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import sentencepiece as spm

from fido.data.errors import DataError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
NUM_SENTINELS = 100
VOCAB_MULTIPLE = 128


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
  """Smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


class Tokenizer:
  """A SentencePiece model plus T5's sentinel and padding conventions.

  Attributes:
    path: the .model file it was loaded from.
    num_pieces: SentencePiece pieces (T5: 32000).
    vocab_size: model vocabulary, num_pieces + 100 rounded up to a multiple of 128 (T5: 32128).
  """

  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID
  num_sentinels = NUM_SENTINELS

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = "<memory>"):
    self._sp = processor
    self.path = str(path)
    self.num_pieces = processor.get_piece_size()
    self.vocab_size = round_up(self.num_pieces + NUM_SENTINELS)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without EOS."""
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (as `encode`). One call per text: SentencePiece's list call took 2x
    (10 passages) to 4x (1 passage) as long per record (its thread pool, even with num_threads=1)."""
    return [self.encode(text) for text in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`: stops at the first EOS, drops pad, shows sentinels as `<extra_id_i>`."""
    out, run = [], []
    for i in (int(i) for i in ids):
      if i == EOS_ID:
        break
      if i == PAD_ID:
        continue
      if i < self.num_pieces:
        run.append(i)
        continue
      out.append(self._decode_run(run, after_text=bool(out)))
      run = []
      out.append(f"<extra_id_{self.sentinel_index(i)}>" if self.is_sentinel(i) else " ⁇ ")
    out.append(self._decode_run(run, after_text=bool(out)))
    return "".join(out)

  def _decode_run(self, run: list[int], after_text: bool) -> str:
    """Decodes pieces; keeps a leading word boundary that SentencePiece drops at string start."""
    text = self._sp.decode(run)
    if after_text and run and self._sp.id_to_piece(run[0]).startswith("▁"):
      text = " " + text
    return text

  def sentinel_id(self, i: int) -> int:
    """Id of `<extra_id_i>`, 0 <= i < 100: num_pieces + 100 - 1 - i."""
    if not 0 <= i < NUM_SENTINELS:
      raise DataError(f"{self.path}: sentinel index {i} out of range [0, {NUM_SENTINELS})")
    return self.num_pieces + NUM_SENTINELS - 1 - i

  def is_sentinel(self, token_id: int) -> bool:
    return self.num_pieces <= token_id < self.num_pieces + NUM_SENTINELS

  def sentinel_index(self, token_id: int) -> int:
    """Inverse of sentinel_id."""
    return self.num_pieces + NUM_SENTINELS - 1 - token_id

  def piece(self, token_id: int) -> str:
    """The SentencePiece piece (or `<extra_id_i>`) of one id, for debugging."""
    if self.is_sentinel(token_id):
      return f"<extra_id_{self.sentinel_index(token_id)}>"
    return self._sp.id_to_piece(token_id) if token_id < self.num_pieces else "<unused>"

  def check_model_vocab(self, model_vocab_size: int) -> None:
    """Raises DataError if a model with `model_vocab_size` embedding rows cannot hold every id."""
    need = self.num_pieces + NUM_SENTINELS
    if model_vocab_size < need:
      raise DataError(
          f"{self.path}: model vocab_size {model_vocab_size} is smaller than the {self.num_pieces} "
          f"SentencePiece pieces + {NUM_SENTINELS} sentinels need ({need}; use {self.vocab_size})")

  def __repr__(self) -> str:
    return f"Tokenizer({self.path!r}, pieces={self.num_pieces}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike, model_vocab_size: int | None = None) -> Tokenizer:
  """Loads a SentencePiece .model; checks pad 0 / EOS 1 / unk 2 and, if given, the model vocab."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: tokenizer file not found")
  try:
    with open(path, "rb") as f:
      proto = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read tokenizer file ({e})") from e
  try:
    sp = spm.SentencePieceProcessor(model_proto=proto)
  except (RuntimeError, OSError, TypeError) as e:
    raise DataError(f"{path}: not a SentencePiece model ({e})") from e
  got = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
  want = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}
  if got != want:
    raise DataError(
        f"{path}: special ids {got} differ from T5's {want}; fido needs pad 0, EOS 1, unk 2 "
        "(retrain with fido.data.tokenizer.train_tokenizer)")
  tok = Tokenizer(sp, path)
  if model_vocab_size is not None:
    tok.check_model_vocab(model_vocab_size)
  return tok


def train_tokenizer(corpus: str | os.PathLike | Iterable[str], out_prefix: str | os.PathLike,
                    vocab_size: int, *, model_type: str = "unigram",
                    extra_options: dict | None = None) -> str:
  """Trains a SentencePiece model with T5's special ids; returns the path of `{out_prefix}.model`.

  Args:
    corpus: a text file (one sentence/document per line) or an iterable of strings.
    out_prefix: writes `{out_prefix}.model` and `{out_prefix}.vocab`.
    vocab_size: number of SentencePiece pieces (the model vocab adds 100 sentinels, rounded up to
      a multiple of 128).
    model_type: 'unigram' (T5) or 'bpe'.
    extra_options: further sentencepiece trainer options.
  """
  out_prefix = os.fspath(out_prefix)
  os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
  options = dict(
      model_prefix=out_prefix, vocab_size=vocab_size, model_type=model_type,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, character_coverage=1.0,
      num_threads=1, minloglevel=2)
  options.update(extra_options or {})
  name = corpus if isinstance(corpus, (str, os.PathLike)) else "<iterable corpus>"
  try:
    if isinstance(corpus, (str, os.PathLike)):
      if not os.path.isfile(corpus):
        raise DataError(f"{corpus}: tokenizer corpus not found")
      spm.SentencePieceTrainer.train(input=os.fspath(corpus), **options)
    else:
      spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), **options)
  except RuntimeError as e:
    raise DataError(f"{name}: sentencepiece training failed ({e})") from e
  return out_prefix + ".model"

