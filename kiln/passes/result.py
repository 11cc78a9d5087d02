"""What a pass returns: whether it changed the graph, what it counted, and its near-misses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class Skip:
    """A place a pass looked at and left alone, and why (shown in the report)."""

    node: str
    reason: str


@dataclass(frozen=True)
class PassResult:
    changed: bool
    counts: Mapping[str, int] = field(default_factory=dict)
    skipped: tuple[Skip, ...] = ()
