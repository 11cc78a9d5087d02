"""What a pass returns: whether it changed the graph, what it counted, its near-misses, and,
for decide-only passes, how many nodes it annotated and what it decided beyond node meta."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Skip:
    """A place a pass looked at and left alone, and why (shown in the report)."""

    node: str
    reason: str


@dataclass(frozen=True)
class PassResult:
    changed: bool  # the graph's structure changed (the runner then lints and recompiles it)
    counts: Mapping[str, int] = field(default_factory=dict)
    skipped: tuple[Skip, ...] = ()
    annotated: int = 0  # nodes whose decision (node.meta) this pass wrote, without changing the graph
    # What a decide-only pass chose beyond node meta, for the stages after it; the pipeline runner
    # returns it (PipelineRun.decided), e.g. assign_precision's plan and the alternatives it weighed.
    decided: Mapping[str, Any] = field(default_factory=dict)
