"""Timing built engines against each other so that a choice between them holds on a re-run.

Engines are timed in alternating blocks (drift of the machine hits every one alike). A block's
median is one sample; the medians of the blocks give each engine's median and a confidence
interval for it (the median's standard error, from the blocks' interquartile range). Two
engines are "within the noise" of each other while their intervals overlap: then more rounds
are timed, up to EXTENSION times the budget, before the faster median is taken, unless the
medians are already within TIE_FRACTION of each other (a tie: either engine will do). Selections
then re-time the winner against the runner-up alone (select.py, precision_search.py): a third
engine's spinning threads or a burst of other load during the first timing cannot decide.

`clock` and `pause` are injectable so the decision logic is tested with fake timers.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

SETTLE_SECONDS = 0.05  # quiet before each timed block: other runtimes' spinning threads park
MIN_ROUNDS = 3
MAX_ROUNDS = 100
# How far past its budget a timing may run while the two fastest engines are within the noise.
EXTENSION = 3.0
# Standard errors apart two medians must be to count as different (about 95% two-sided).
Z_SEPARATED = 2.0
# Two medians this close, once the budget is spent, are a tie: timing on to tell them apart
# cost ResNet-50's default compile 12 s (ONNX Runtime 39.12 ms against OpenVINO 39.29) to choose
# between engines either of which keeps effort="default"'s promise of 5% within the best.
TIE_FRACTION = 0.02

# Engines whose calls all take this long are timed one call per block, with no untimed call
# first: a call this long is its own average over the jitter a block's median smooths, and the
# first call after a switch of engine costs a fraction of it. Three rounds of GPT-2's two fp32
# candidates (170 ms a call) took 6 s at four calls a block, where the 1 s budget asked for 2.
LONG_CALL_SECONDS = 0.05

Clock = Callable[[], float]
Pause = Callable[[float], None]


@dataclass
class Timed:
    """Per engine, the median seconds per call of each timed block, in the order timed."""

    blocks: list[list[float]]
    extended: bool = False  # rounds were added because the two fastest were within the noise
    calls: list[list[float]] = field(default_factory=list)  # per engine, every timed call's seconds (for p99)

    def medians(self) -> list[float]:
        return [statistics.median(b) for b in self.blocks]

    def ranking(self) -> list[int]:
        """Engine indexes, fastest median first."""
        medians = self.medians()
        return sorted(range(len(medians)), key=medians.__getitem__)

    def decided(self) -> bool:
        """Whether the fastest engine is apart from the runner-up beyond the noise."""
        if len(self.blocks) < 2:
            return True
        first, second = self.ranking()[:2]
        return separated(self.blocks[first], self.blocks[second])

    def tied(self) -> bool:
        """Whether the fastest engine's median is within TIE_FRACTION of the runner-up's."""
        if len(self.blocks) < 2:
            return False
        first, second = sorted(self.medians())[:2]
        return second - first < TIE_FRACTION * first


def median_interval(samples: Sequence[float]) -> tuple[float, float]:
    """(median, half-width of its ~95% interval): the median's standard error is about
    1.25 sigma / sqrt(n), sigma estimated robustly as IQR / 1.35."""
    median = statistics.median(samples)
    if len(samples) < 4:
        return median, math.inf
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return median, Z_SEPARATED * 1.2533 * (q3 - q1) / 1.349 / math.sqrt(len(samples))


def separated(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the medians of block samples `a` and `b` differ by more than their noise."""
    median_a, half_a = median_interval(a)
    median_b, half_b = median_interval(b)
    return abs(median_a - median_b) > math.hypot(half_a, half_b)


def time_engines(engines: Sequence[Callable], inputs: tuple[torch.Tensor, ...], budget_seconds: float, block: int = 3,
                 *, clock: Clock | None = None, pause: Pause | None = None) -> Timed:
    """Time `engines` interleaved on `inputs` for about `budget_seconds`, at least MIN_ROUNDS
    rounds; while the two fastest are within the noise, go on up to EXTENSION x the budget.
    Runtimes leave worker threads spinning after a call (ONNX Runtime's intra-op pool) that
    take the cores the next engine runs on, so each block starts after SETTLE_SECONDS of quiet
    and one untimed call: each engine is timed as if alone. Engines of LONG_CALL_SECONDS or
    more a call are timed one call a block, with no untimed call."""
    clock = clock or time.perf_counter
    pause = pause or time.sleep  # looked up per call: tests replace time.sleep
    warm = []
    for engine in engines:
        engine(*inputs)
        begin = clock()
        engine(*inputs)
        warm.append(clock() - begin)
    if min(warm) >= LONG_CALL_SECONDS:  # one call per block, none untimed (see LONG_CALL_SECONDS)
        block, untimed = 1, False
    else:
        untimed = True
    timed = Timed([[] for _ in engines], calls=[[] for _ in engines])
    start = clock()
    rounds = 0
    while rounds < MIN_ROUNDS or rounds < MAX_ROUNDS and _goes_on(timed, clock() - start, budget_seconds):
        for engine, blocks, calls in zip(engines, timed.blocks, timed.calls):
            if len(engines) > 1:
                pause(SETTLE_SECONDS)
            if untimed:
                engine(*inputs)
            samples = []
            for _ in range(block):
                begin = clock()
                engine(*inputs)
                samples.append(clock() - begin)
            blocks.append(statistics.median(samples))
            calls.extend(samples)
        rounds += 1
    return timed


def _goes_on(timed: Timed, spent: float, budget_seconds: float) -> bool:
    if spent < budget_seconds:
        return True
    if spent < EXTENSION * budget_seconds and not timed.decided() and not timed.tied():
        timed.extended = True
        return True
    return False


@dataclass(frozen=True)
class Confirmed:
    """The outcome of re-timing the first timing's winner against its runner-up."""

    winner: int  # engine index into the first timing
    runner_up: int
    medians: tuple[float, float]  # (winner, runner-up) seconds per call, as decided
    flipped: bool  # the runner-up was faster once re-timed


def confirm(engines: Sequence[Callable], inputs: tuple[torch.Tensor, ...], first: Timed, budget_seconds: float,
            *, clock: Clock | None = None, pause: Pause | None = None) -> Confirmed | None:
    """Re-time the fastest of `first` against the runner-up, alone. Where that timing tells them
    apart it decides; where they are still within the noise, the faster median over the blocks
    of both timings wins. None when fewer than two engines were timed."""
    if len(engines) < 2:
        return None
    best, runner_up = first.ranking()[:2]
    again = time_engines([engines[best], engines[runner_up]], inputs, budget_seconds, clock=clock, pause=pause)
    if again.decided():  # the two alone, apart beyond the noise: this timing decides
        medians = tuple(again.medians())
    else:  # still within the noise: both timings' blocks together
        medians = (statistics.median(first.blocks[best] + again.blocks[0]),
                   statistics.median(first.blocks[runner_up] + again.blocks[1]))
    if medians[1] < medians[0]:
        return Confirmed(runner_up, best, (medians[1], medians[0]), True)
    return Confirmed(best, runner_up, medians, False)
