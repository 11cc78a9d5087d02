"""How kiln decides which of several engines is faster, driven by a fake clock: engines are
fake calls that advance it by a chosen cost (with seeded jitter), so each decision is exact
and nothing here depends on the speed of the machine running the tests."""

from __future__ import annotations

import random

import pytest

from kiln import timing
from kiln.timing import Timed, confirm, median_interval, separated, time_engines

INPUTS = ()


class FakeMachine:
    """A clock that only the engines' calls and the pauses move."""

    def __init__(self, seed: int = 0):
        self.now, self.rng, self.pauses = 0.0, random.Random(seed), 0

    def clock(self) -> float:
        return self.now

    def pause(self, seconds: float) -> None:
        self.pauses += 1
        self.now += seconds

    def engine(self, cost: float, jitter: float = 0.0, costs=None):
        """A call taking `cost` seconds, +- up to `jitter` relative, or the next of `costs`."""
        source = iter(costs) if costs is not None else None

        def call(*inputs):
            spent = next(source) if source is not None else cost * (1 + self.rng.uniform(-jitter, jitter))
            self.now += spent
        return call

    def time(self, engines, budget: float) -> Timed:
        return time_engines(engines, INPUTS, budget, clock=self.clock, pause=self.pause)


def test_engines_far_apart_are_timed_for_the_budget_and_no_longer():
    machine = FakeMachine()
    timed = machine.time([machine.engine(1e-3, 0.05), machine.engine(2e-3, 0.05)], budget=1.0)
    assert not timed.extended and timed.decided()
    assert timed.ranking() == [0, 1]
    assert timed.medians()[0] == pytest.approx(1e-3, rel=0.05) and timed.medians()[1] == pytest.approx(2e-3, rel=0.05)
    rounds = len(timed.blocks[0])
    one_round = 2 * timing.SETTLE_SECONDS + 4 * 1e-3 + 4 * 2e-3  # two pauses, and per engine one untimed + 3 timed calls
    assert rounds == pytest.approx(1.0 / one_round, abs=1)


def test_slow_engines_are_timed_one_call_a_block_so_the_budget_holds_more_rounds():
    machine = FakeMachine()
    slow = timing.LONG_CALL_SECONDS * 3
    timed = machine.time([machine.engine(slow, 0.02), machine.engine(2 * slow, 0.02)], budget=2.0)
    assert timed.decided() and timed.ranking() == [0, 1]
    assert all(len(calls) == len(blocks) for calls, blocks in zip(timed.calls, timed.blocks))  # one timed call a block
    one_round = 2 * timing.SETTLE_SECONDS + slow + 2 * slow  # no untimed call
    assert len(timed.blocks[0]) == pytest.approx(2.0 / one_round, abs=1) and len(timed.blocks[0]) > timing.MIN_ROUNDS
    spent = machine.now - 2 * (slow + 2 * slow)  # less the warm-up calls
    assert spent < 2.0 + one_round  # the budget, not the minimum rounds, bounds it
    # one fast engine among them keeps the blocks of three
    mixed = machine.time([machine.engine(1e-3), machine.engine(slow)], budget=0.5)
    assert len(mixed.calls[0]) == 3 * len(mixed.blocks[0])


def test_engines_within_the_noise_of_each_other_get_more_rounds_up_to_the_extension():
    machine = FakeMachine()
    timed = machine.time([machine.engine(1.00e-3, 0.3), machine.engine(1.10e-3, 0.3)], budget=0.2)
    assert timed.extended and not timed.tied()
    spent = machine.now - 2 * 2 * 1e-3  # less the warm-up calls
    assert 0.2 * 1.5 < spent <= 0.2 * timing.EXTENSION + 0.2  # past the budget, and stopped near the extension


def test_engines_tied_within_two_percent_are_not_timed_past_the_budget():
    # whichever of the two is taken, the choice is within 2% of the other: more rounds would not pay
    machine = FakeMachine()
    timed = machine.time([machine.engine(1.000e-3, 0.05), machine.engine(1.005e-3, 0.05)], budget=0.2)
    assert timed.tied() and not timed.extended
    assert machine.now - 2 * 2 * 1e-3 < 0.2 + 0.2  # the budget and at most the round that spent it


def test_rounds_stop_once_the_extra_rounds_separate_the_two_fastest():
    # the budget is spent after the minimum rounds, too few blocks to know the noise: one
    # more round tells these two (10% apart, 5% jitter) apart, and the timing stops there
    machine = FakeMachine()
    timed = machine.time([machine.engine(1.1e-3, 0.05), machine.engine(1.0e-3, 0.05)], budget=0.2)
    assert timed.extended and timed.decided() and timed.ranking()[0] == 1
    assert len(timed.blocks[0]) == timing.MIN_ROUNDS + 1


def test_at_least_the_minimum_rounds_are_timed_on_a_spent_budget():
    machine = FakeMachine()
    timed = machine.time([machine.engine(1e-3), machine.engine(3e-3)], budget=0.0)
    assert [len(b) for b in timed.blocks] == [timing.MIN_ROUNDS] * 2
    assert machine.pauses == 2 * timing.MIN_ROUNDS  # a quiet pause before every block


def test_one_engine_is_timed_without_pauses():
    machine = FakeMachine()
    timed = machine.time([machine.engine(1e-3)], budget=0.01)
    assert machine.pauses == 0 and timed.decided()


def test_separated_needs_the_gap_between_medians_to_exceed_their_noise():
    steady_a, steady_b = [1.0, 1.01, 0.99, 1.0, 1.0, 1.02], [1.1, 1.11, 1.09, 1.1, 1.1, 1.12]
    assert separated(steady_a, steady_b)
    noisy_b = [0.8, 1.4, 0.9, 1.3, 1.1, 1.2]
    assert not separated(steady_a, noisy_b)
    assert not separated(steady_a[:3], steady_b[:3])  # too few blocks to know the noise


def test_the_median_interval_narrows_as_blocks_accumulate():
    rng = random.Random(1)
    few = [1 + rng.gauss(0, 0.1) for _ in range(8)]
    many = few + [1 + rng.gauss(0, 0.1) for _ in range(120)]
    assert median_interval(many)[1] < median_interval(few)[1] / 2


def test_the_re_timing_hands_the_choice_to_the_runner_up_when_the_first_timing_was_disturbed():
    # the first timing saw engine 0 at 1.0 ms (engine 1 slowed by a burst of load); alone,
    # engine 0 runs 1.2 ms and engine 1 1.0 ms
    machine = FakeMachine()
    first = Timed([[1.0e-3] * 5, [1.1e-3] * 5, [3.0e-3] * 5])
    engines = [machine.engine(1.2e-3, 0.02), machine.engine(1.0e-3, 0.02), machine.engine(3e-3)]
    confirmed = confirm(engines, INPUTS, first, 0.2, clock=machine.clock, pause=machine.pause)
    assert confirmed.flipped and (confirmed.winner, confirmed.runner_up) == (1, 0)
    assert confirmed.medians[0] < confirmed.medians[1]


def test_the_re_timing_keeps_a_winner_that_holds():
    machine = FakeMachine()
    first = Timed([[1.0e-3] * 5, [1.5e-3] * 5])
    engines = [machine.engine(1.0e-3, 0.02), machine.engine(1.5e-3, 0.02)]
    confirmed = confirm(engines, INPUTS, first, 0.1, clock=machine.clock, pause=machine.pause)
    assert not confirmed.flipped and confirmed.winner == 0
    assert confirm(engines[:1], INPUTS, Timed([[1.0e-3] * 5]), 0.1, clock=machine.clock, pause=machine.pause) is None
