"""The placement solver: exact for two devices (checked against brute force on random
problems), never worse than its start for three, one transfer per tensor and device."""

from __future__ import annotations

import itertools
import random

import pytest

from kiln.placement.solver import Problem, Value, solve, total_seconds


def _transfer(size, a, b):
    return 0.0 if a == b else size * 1e-9 + 2e-5


def _random_problem(rng: random.Random, devices: list[str], units: int) -> Problem:
    names = [f"n{i}" for i in range(units)]
    cost = {"in": {devices[0]: 0.0}, "out": {devices[0]: 0.0}}
    for name in names:
        options = {d: rng.uniform(1e-6, 1e-3) for d in devices if rng.random() > 0.15}
        cost[name] = options or {devices[0]: rng.uniform(1e-6, 1e-3)}
    values = [Value("in", rng.uniform(1e3, 1e6), (names[0],))]
    for i, name in enumerate(names):
        later = names[i + 1:]
        readers = tuple(rng.sample(later, min(len(later), rng.randint(1, 3)))) if later else ("out",)
        values.append(Value(name, rng.uniform(1e3, 1e6), readers))
    values.append(Value(names[-1], 1e3, ("out",)))
    return Problem(devices, cost, values, _transfer)


def _brute_force(problem: Problem) -> float:
    units = list(problem.cost)
    best = float("inf")
    for choice in itertools.product(*(list(problem.cost[u]) for u in units)):
        best = min(best, total_seconds(problem, dict(zip(units, choice))))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_two_device_placement_is_the_exact_optimum(seed):
    problem = _random_problem(random.Random(seed), ["cpu", "gpu"], units=9)
    labels = solve(problem)
    assert total_seconds(problem, labels) == pytest.approx(_brute_force(problem), rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_three_device_placement_is_close_to_optimal_and_feasible(seed):
    problem = _random_problem(random.Random(100 + seed), ["cpu", "gpu", "npu"], units=7)
    labels = solve(problem)
    assert all(labels[u] in problem.cost[u] for u in problem.cost)
    assert total_seconds(problem, labels) <= 2 * _brute_force(problem)  # alpha-expansion's bound for Potts costs


def test_a_tensor_read_by_several_nodes_on_another_device_is_moved_once():
    problem = Problem(["cpu", "gpu"], {"in": {"cpu": 0.0}, "a": {"gpu": 0.0}, "b": {"gpu": 0.0}},
                      [Value("in", 1e6, ("a", "b"))], _transfer)
    labels = solve(problem)
    assert total_seconds(problem, labels) == pytest.approx(_transfer(1e6, "cpu", "gpu"))
