"""Choose one device per graph node to minimise estimated end-to-end latency.

The runtime runs partitions one after another, so latency is a sum: every node's time on its
device plus every tensor's transfer time to each other device that reads it. With two devices
that is a binary labelling whose pairwise terms are submodular, so one s-t minimum cut finds
the exact optimum (each node is a vertex; cutting s->n costs its time on the second device,
n->t its time on the first; a transfer term is an auxiliary vertex per tensor, so a tensor read
by several nodes on the other device is paid once, not once per reader). With more devices,
alpha-expansion: for each device in turn, one min cut decides which nodes move to it; a move
is kept only when the exact total (`total_seconds`) goes down, and sweeps repeat until no
device improves it. A DP over the topological order would be exact only on chains; residual
and attention graphs branch and rejoin, which the cut handles without approximation for two
devices. networkx's preflow-push computes the cuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import networkx as nx

SOURCE, SINK = "\x00source", "\x00sink"
# Seconds are scaled to microseconds for the flow solver; "forbidden" is a large finite
# capacity (networkx treats a missing capacity as infinite, which we use for hard ties).
SCALE = 1e6
FORBIDDEN = 1e12
MAX_SWEEPS = 6


@dataclass(frozen=True)
class Value:
    """A tensor: produced by `producer`, read by `consumers` (units), `num_bytes` big."""

    producer: str
    num_bytes: float
    consumers: tuple[str, ...]


@dataclass
class Problem:
    devices: list[str]
    cost: dict[str, dict[str, float]]  # unit -> device -> seconds; a missing device is not allowed
    values: list[Value]
    transfer: Callable[[float, str, str], float]  # (bytes, from device, to device) -> seconds
    start: dict[str, str] = field(default_factory=dict)  # unit -> device to start from


def total_seconds(problem: Problem, labels: dict[str, str]) -> float:
    """Exact estimated latency of a labelling: node times plus one transfer per (tensor, device)."""
    total = 0.0
    for unit, device in labels.items():
        total += problem.cost[unit].get(device, math.inf)
    for value in problem.values:
        source = labels[value.producer]
        for target in {labels[c] for c in value.consumers} - {source}:
            total += problem.transfer(value.num_bytes, source, target)
    return total


def solve(problem: Problem) -> dict[str, str]:
    labels = {unit: problem.start.get(unit) or min(costs, key=costs.get) for unit, costs in problem.cost.items()}
    best = total_seconds(problem, labels)
    for _ in range(MAX_SWEEPS):
        improved = False
        for alpha in problem.devices:
            candidate = _expand(problem, labels, alpha)
            value = total_seconds(problem, candidate)
            if value < best - 1e-12:
                labels, best, improved = candidate, value, True
        if not improved:
            break
    return labels


def _expand(problem: Problem, labels: dict[str, str], alpha: str) -> dict[str, str]:
    """One alpha-expansion move: each unit keeps its device (source side) or moves to alpha."""
    graph = nx.DiGraph()
    graph.add_node(SOURCE)
    graph.add_node(SINK)

    def add(u: str, v: str, capacity: float | None) -> None:
        if capacity is None:
            graph.add_edge(u, v)  # no capacity attribute: infinite
        elif capacity > 0:
            old = graph.get_edge_data(u, v, {}).get("capacity", 0.0)
            graph.add_edge(u, v, capacity=old + capacity)

    for unit, costs in problem.cost.items():
        keep = costs.get(labels[unit], math.inf)
        move = costs.get(alpha, math.inf)
        graph.add_node(unit)
        if labels[unit] == alpha:  # already there: on the alpha side, so transfers to readers elsewhere count
            add(unit, SINK, None)
            continue
        add(SOURCE, unit, _cap(move))  # cut when the unit moves to alpha (sink side)
        add(unit, SINK, _cap(keep))  # cut when it keeps its device
    for index, value in enumerate(problem.values):
        _add_transfer(problem, labels, alpha, index, value, add)
    _, (kept, _) = nx.minimum_cut(graph, SOURCE, SINK)
    return {unit: labels[unit] if unit in kept else alpha for unit in problem.cost}


def _add_transfer(problem: Problem, labels, alpha: str, index: int, value: Value, add) -> None:
    producer, size = value.producer, value.num_bytes
    # producer keeps its device, some reader moves to alpha: one transfer to alpha
    to_alpha = problem.transfer(size, labels[producer], alpha)
    if to_alpha > 0:
        aux = f"\x00out{index}"
        add(producer, aux, _cap(to_alpha))
        for consumer in value.consumers:
            add(aux, consumer, None)
    # producer moves to alpha, some reader keeps another device: one transfer per such device
    staying = [c for c in value.consumers if labels[c] != alpha]
    if staying:
        back = max(problem.transfer(size, alpha, labels[c]) for c in staying)
        aux = f"\x00in{index}"
        for consumer in staying:
            add(consumer, aux, None)
        add(aux, producer, _cap(back))


def _cap(seconds: float) -> float:
    return FORBIDDEN if math.isinf(seconds) else seconds * SCALE
