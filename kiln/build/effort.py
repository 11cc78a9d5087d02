"""Which of a partition's candidate backends are built, at the compile's effort
(CompileOptions.effort):

  max      every candidate the device lists is built, verified and timed; backends autotune
  default  the candidates that could still win: one that this host measured, on a graph of the
           same kind, at SKIP_FACTOR or more of the fastest candidate's time, or behind it beyond
           the noise and by more than a tie (TIE_FRACTION), is left out, with that figure as the
           reason (kiln/build/host_record.py)
  fast     the one candidate predicted to win: the host record's fastest, else the device's
           first preference; the next one is built only if it fails or disagrees with eager

A forced backend, an eager partition, or a profile that selects by preference has nothing to
leave out: its candidates are tried as before.

precision="auto" times its lowered plan against an fp32 build of the model (precision_search).
At effort="default" that fp32 build and its races are left out where this host raced the same
plan on a graph of the same kind before and fp32 ran RACE_SKIP_FACTOR or more of its time
(RecordedRaces); effort="max", or time_against_fp32=True, always races.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from kiln.build.host_record import HostRecord, Recorded, plan_kind
from kiln.timing import TIE_FRACTION
from kiln.ir import LayerPlan

# A candidate measured this much slower than the winner is left out: effort="default" promises
# an engine within 5% of the one effort="max" picks, and the record is an interleaved timing
# (a few percent of noise). At 1.10, ONNX Runtime recorded at 1.05-1.09x OpenVINO on MiniLM
# and BERT-base was rebuilt on every compile, 10-15 s each time, and lost every time. Closer
# than that, a candidate is left out only where its timing put it behind beyond the noise and
# by more than a tie (_cannot_win): ONNX Runtime 3-5% behind OpenVINO on BERT-base and GPT-2,
# built beside it on every default compile, took those past 20 s and lost each time.
SKIP_FACTOR = 1.05
# fp32 recorded this much slower than a lowered plan is not built to race it again at
# effort="default": well past the races' own 3% minimum lead and their few percent of noise.
RACE_SKIP_FACTOR = 1.10


@dataclass(frozen=True)
class CandidatePlan:
    mode: str  # "prefer": the first that builds and verifies; "measure": the fastest of those built
    order: tuple[str, ...]  # the candidates to try, in order
    left_out: dict[str, str] = field(default_factory=dict)  # backend -> why it is not built
    fallback: bool = False  # a failed candidate makes way for the next even in "prefer" mode
    why_first: str = ""  # "prefer" mode: why the first candidate comes first


def plan_candidates(names: tuple[str, ...], mode: str, effort: str, recorded: dict[str, Recorded]) -> CandidatePlan:
    """The candidates of `names` (the device's preference order) to build at `effort`, given what
    this host recorded for the partition's kind of graph."""
    if len(names) <= 1:
        return CandidatePlan(mode, tuple(names))
    if effort == "max":
        return CandidatePlan("measure", tuple(names))
    if effort == "fast":
        return _fastest_predicted(names, recorded)
    if mode != "measure":
        return CandidatePlan(mode, tuple(names))
    left_out = {name: f"{recorded[name].describe()}; effort='default' builds only candidates that could still win "
                      "(effort='max' builds every one)"
                for name in names if name in recorded and _cannot_win(recorded[name])}
    if len(left_out) == len(names):  # a record cannot rule out everything; the least slow stays
        keep = min(names, key=lambda n: recorded[n].factor)
        del left_out[keep]
    return CandidatePlan("measure", tuple(n for n in names if n not in left_out), left_out)


def _cannot_win(recorded: Recorded) -> bool:
    """Measured SKIP_FACTOR or more of the winner's time, or behind it beyond the noise and
    past a tie (TIE_FRACTION): only a change of the machine would let it win."""
    return recorded.factor >= SKIP_FACTOR or recorded.apart and recorded.factor >= 1 + TIE_FRACTION


def _fastest_predicted(names: tuple[str, ...], recorded: dict[str, Recorded]) -> CandidatePlan:
    """Recorded winners first, then candidates never measured here (in preference order), then
    recorded losers, slowest last."""
    def rank(item):
        index, name = item
        if name not in recorded:
            return (1, 0.0, index)
        factor = recorded[name].factor
        return (2 if _cannot_win(recorded[name]) else 0, factor, index)

    order = tuple(name for _, name in sorted(enumerate(names), key=rank))
    first = order[0]
    if first in recorded:
        why = f"{first} was predicted to win: {recorded[first].describe()}"
    else:
        why = f"{first} is the device's first preference (this host has no measurement for a graph of this kind yet)"
    return CandidatePlan("prefer", order, fallback=True, why_first=f"effort='fast' builds one candidate; {why}")


class RecordedRaces:
    """precision_search's race history on this host (precision_search.RaceHistory): every race
    of a plan against fp32 is stored; `trusted` (effort="default") reads them back."""

    def __init__(self, record: HostRecord, gm: torch.fx.GraphModule, trusted: bool):
        self.record, self.gm, self.trusted = record, gm, trusted

    def known_win(self, plans: Mapping[str, LayerPlan]) -> str | None:
        if not self.trusted:
            return None
        race = self.record.lookup_race(plan_kind(self.gm, plans))
        if race is None or race.fp32_factor < RACE_SKIP_FACTOR:
            return None
        return (f"{race.describe()}; effort='default' does not race a plan recorded {RACE_SKIP_FACTOR:.2f}x or more "
                "faster than fp32 again (effort='max' does)")

    def store(self, plans: Mapping[str, LayerPlan], lowered_s: float, fp32_s: float) -> None:
        self.record.store_race(plan_kind(self.gm, plans), lowered_s * 1e3, fp32_s * 1e3)
