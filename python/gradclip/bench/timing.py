"""Fair timing: every contender runs on identical inputs, restored by an untimed
copy before each timed call; warm-up calls first; repetitions interleaved
(round r runs every contender once, starting at a rotating position) so slow
drift of the machine hits all contenders alike; device work is synchronised
before the clock starts and before it stops."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Stats:
    median: float
    p20: float
    p80: float
    min: float
    mean: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        a = np.asarray(samples, dtype=np.float64)
        p20, median, p80 = np.percentile(a, [20, 50, 80])
        return cls(float(median), float(p20), float(p80), float(a.min()), float(a.mean()), int(a.size))


@dataclass(frozen=True)
class RoundPolicy:
    """How many interleaved rounds to time: ``fixed`` when given, else as many
    as fit in ``budget_s`` (judged from the warm-up), within [min_rounds, max_rounds]."""

    warmup: int = 2
    fixed: Optional[int] = None
    budget_s: float = 2.0
    min_rounds: int = 7
    max_rounds: int = 40

    def rounds_for(self, round_s: float) -> int:
        if self.fixed is not None:
            return self.fixed
        fit = int(self.budget_s / max(round_s, 1e-9))
        return max(self.min_rounds, min(self.max_rounds, fit))


def interleaved(
    calls: Dict[str, Callable[[], object]],
    restore: Callable[[], None],
    sync: Callable[[], None],
    policy: RoundPolicy,
) -> Dict[str, List[float]]:
    """Seconds per call for each contender. ``restore`` (untimed) puts the
    pristine inputs back before every call, warm-up included."""
    names = list(calls)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    clock = time.perf_counter

    def one_round(r: int, record: bool) -> None:
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = calls[name]
            restore()
            sync()
            t0 = clock()
            fn()
            sync()
            t1 = clock()
            if record:
                samples[name].append(t1 - t0)

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no collector pauses inside a timed call
    try:
        round_s = math.inf
        for r in range(max(policy.warmup, 1)):  # at least one call each: it also sizes the auto rounds
            t0 = clock()
            one_round(r, record=False)
            round_s = clock() - t0
        for r in range(policy.rounds_for(round_s)):
            one_round(r, record=True)
    finally:
        if was_enabled:
            gc.enable()
    return samples
