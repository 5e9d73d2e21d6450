"""T5 span corruption (Raffel et al. 2020, sec. 3.1.4; t5.data.preprocessors.span_corruption).

A window of `tokens_length` raw tokens is split into alternating non-noise / noise spans:
num_noise = round(length * noise_density), num_spans = round(num_noise / mean_span_length), span
lengths drawn by T5's `_random_segmentation` (a random partition into non-empty parts); the text
always starts with a non-noise span. Each noise span is replaced in the inputs by one sentinel
(`<extra_id_0>`, `<extra_id_1>`, ... = ids counting down from the top of the vocabulary); the
targets are each sentinel followed by the span it replaced. Both end with EOS. With inputs 512,
density 0.15 and mean span 3 the raw window is 568 tokens and the targets 114 (T5's
`random_spans_helper`).

Shapes: L_in = inputs_length, L_tgt = targets_length.
  inputs int32 [L_in] (0 pad), inputs_mask bool [L_in],
  targets int32 [L_tgt] (0 pad), targets_mask bool [L_tgt].
"""

from __future__ import annotations

import numpy as np

from fido.data.errors import DataError
from fido.data.tokenizer import EOS_ID, NUM_SENTINELS, Tokenizer


def _counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) for a window of `length` tokens, as T5."""
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  return num_noise, num_spans


def span_corruption_lengths(inputs_length: int = 512, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> tuple[int, int]:
  """T5's random_spans_helper: (raw tokens_length, targets_length) whose inputs fit inputs_length.

  Both counts include one EOS and one sentinel per span: 512 -> (568, 114).
  """
  def lengths(tokens_length):
    num_noise, num_spans = _counts(tokens_length, noise_density, mean_span_length)
    return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1

  if inputs_length < 2:
    raise DataError(f"span corruption inputs_length must be >= 2, got {inputs_length}")
  tokens_length = inputs_length - 1
  while lengths(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  targets_length = lengths(tokens_length)[1]
  if noise_density == 0.5 and targets_length > inputs_length:  # as T5: keep targets <= inputs
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def check_span_config(tokens_length: int, noise_density: float, mean_span_length: float) -> None:
  """Raises DataError for densities out of range or spans needing more than 100 sentinels."""
  if not 0.0 < noise_density < 1.0:
    raise DataError(f"noise_density must be in (0, 1), got {noise_density}")
  if mean_span_length < 1.0:
    raise DataError(f"mean_span_length must be >= 1, got {mean_span_length}")
  _, num_spans = _counts(tokens_length, noise_density, mean_span_length)
  if num_spans > NUM_SENTINELS:
    raise DataError(f"span corruption of {tokens_length} tokens makes {num_spans} noise spans but "
                    f"the vocabulary has only {NUM_SENTINELS} sentinels; use shorter inputs")


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Random partition of num_items into num_segments non-empty parts; returns int [num_segments]."""
  first_in_segment = np.zeros(num_items, bool)
  first_in_segment[1 + rng.permutation(num_items - 1)[:num_segments - 1]] = True
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """bool [length]: True on noise tokens, first span non-noise (T5's random_spans_noise_mask)."""
  if length < 2:
    return np.zeros(length, bool)
  num_noise, num_spans = _counts(length, noise_density, mean_span_length)
  num_spans = min(num_spans, num_noise, length - num_noise)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  start_indicator = np.zeros(length, np.int32)
  start_indicator[span_starts] = 1
  return np.cumsum(start_indicator) % 2 == 1


def _replace_spans(tokens: np.ndarray, span_mask: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
  """Replaces each run of True in span_mask by one sentinel (<extra_id_0>, <extra_id_1>, ...)."""
  prev = np.concatenate([[False], span_mask[:-1]])
  first = span_mask & ~prev
  sentinel_index = np.cumsum(first) - 1
  out = np.where(first, tokenizer.sentinel_id(0) - sentinel_index, tokens)
  return out[~(span_mask & prev)]


def corrupt(tokens: np.ndarray, noise_mask: np.ndarray,
            tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets), no EOS: noise spans -> sentinels in inputs, sentinel + span in targets."""
  inputs = _replace_spans(tokens, noise_mask, tokenizer)
  return inputs, _replace_spans(tokens, ~noise_mask, tokenizer)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, tokenizer: Tokenizer) -> list[int]:
  """Inverse of `corrupt` (ignores EOS/pad): splices each target span back at its sentinel."""
  spans, current = {}, None
  for t in targets:
    t = int(t)
    if t in (EOS_ID, 0):
      break
    if tokenizer.is_sentinel(t):
      current = spans.setdefault(t, [])
    elif current is not None:
      current.append(t)
  out = []
  for t in inputs:
    t = int(t)
    if t in (EOS_ID, 0):
      break
    out.extend(spans.get(t, []) if tokenizer.is_sentinel(t) else [t])
  return out


def _pad(row: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.zeros((length,), np.int32)
  ids[:len(row)] = row
  return ids, np.arange(length) < len(row)


def span_corrupt_example(tokens: list[int] | np.ndarray, tokenizer: Tokenizer,
                         rng: np.random.Generator, *, inputs_length: int = 512,
                         targets_length: int | None = None, noise_density: float = 0.15,
                         mean_span_length: float = 3.0) -> dict:
  """Corrupts a random window of one document's tokens.

  Returns inputs/inputs_mask [L_in] and targets/targets_mask [L_tgt], each with EOS and 0 padding.
  targets_length defaults to what span_corruption_lengths(inputs_length) needs (114 for 512).
  """
  tokens_length, needed = span_corruption_lengths(inputs_length, noise_density, mean_span_length)
  targets_length = needed if targets_length is None else targets_length
  if targets_length < needed:
    raise DataError(f"targets_length {targets_length} is smaller than the {needed} that span "
                    f"corruption of {tokens_length} tokens needs (inputs_length={inputs_length})")
  tokens = np.asarray(tokens, np.int32)
  if len(tokens) > tokens_length:
    start = int(rng.integers(len(tokens) - tokens_length + 1))
    tokens = tokens[start:start + tokens_length]
  noise = random_spans_noise_mask(len(tokens), noise_density, mean_span_length, rng)
  inputs, targets = corrupt(tokens, noise, tokenizer)
  inputs, inputs_mask = _pad(np.append(inputs, EOS_ID), inputs_length)
  targets, targets_mask = _pad(np.append(targets, EOS_ID), targets_length)
  return {"inputs": inputs, "inputs_mask": inputs_mask, "targets": targets,
          "targets_mask": targets_mask}


def as_qa_example(example: dict) -> dict:
  """Span-corruption arrays -> QA keys with one passage (works on [L] examples and [B, L] batches).

  inputs [.., L_in] -> passage_ids [.., 1, L_in]; targets -> target_ids; masks likewise.
  """
  return {"passage_ids": np.expand_dims(example["inputs"], -2),
          "passage_mask": np.expand_dims(example["inputs_mask"], -2),
          "target_ids": example["targets"], "target_mask": example["targets_mask"]}
