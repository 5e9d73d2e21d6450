"""Timing engines side by side: calls alternate round-robin, ratios are taken round by round."""

import statistics
import time
from typing import Any, Callable, Sequence

import jax


def time_interleaved(fns: Sequence[Callable[[], Any]], repeats: int,
                     warmup: int) -> list[list[float]]:
  """Seconds per call of each of `fns`, called round-robin (`warmup` untimed rounds first).

  jax results are waited for; other results (torch tensors) pass `block_until_ready` unchanged.
  No idling between calls: measured on the 2-core CPU, a 0.1-0.5 s pause before each call slows
  our decoder ~10% (worker threads fall asleep), with or without another runtime in between.
  """
  for _ in range(warmup):
    for fn in fns:
      jax.block_until_ready(fn())
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, seconds in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      seconds.append(time.perf_counter() - start)
  return times


def paired_ratios(numerator_s: Sequence[float], denominator_s: Sequence[float]) -> list[float]:
  """[min, median, max] over rounds of numerator / denominator (times taken in the same round).

  Round by round, drift on a shared machine cancels; the spread shows how much it moved the ratio.
  """
  ratios = [n / d for n, d in zip(numerator_s, denominator_s, strict=True)]
  return [round(min(ratios), 2), round(statistics.median(ratios), 2), round(max(ratios), 2)]
