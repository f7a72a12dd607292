"""Interleaved A/B timing for the benchmarks of one function against another that must give the same output."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(before: Callable[[], object], now: Callable[[], object], rounds: int,
                prepare: Callable[[], None] = lambda: None) -> tuple[list[float], list[float], object]:
    """Time `before` and `now` in `rounds` interleaved rounds (`prepare` ahead of each timing: dropping the page cache,
    say), refusing outputs that differ; the times of each and the output."""
    times_before, times_now, out = [], [], None
    for _ in range(rounds):
        took = []
        for fn in (before, now):
            prepare()
            start = time.perf_counter()
            outputs = fn()
            took.append(time.perf_counter() - start)
            assert out is None or outputs == out, (outputs, out)
            out = outputs
        times_before.append(took[0])
        times_now.append(took[1])
    return times_before, times_now, out


def in_words(labels: tuple[str, str], times_before: list[float], times_now: list[float]) -> str:
    """Each one's median time and the median ratio before ÷ now, with its range over the rounds."""
    ratios = [b / n for b, n in zip(times_before, times_now)]
    return (f"{labels[0]} {statistics.median(times_before):.2f} s, {labels[1]} {statistics.median(times_now):.2f} s, "
            f"ratio {statistics.median(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f})")
