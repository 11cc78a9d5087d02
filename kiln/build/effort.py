"""Which of a partition's candidate backends are built, at the compile's effort
(CompileOptions.effort):

  max      every candidate the device lists is built, verified and timed; backends autotune
  default  the candidates that could still win: one that this host measured, on a graph of the
           same kind, at SKIP_FACTOR or more of the fastest candidate's time is left out, with
           that figure as the reason (kiln/build/host_record.py)
  fast     the one candidate predicted to win: the host record's fastest, else the device's
           first preference; the next one is built only if it fails or disagrees with eager

A forced backend, an eager partition, or a profile that selects by preference has nothing to
leave out: its candidates are tried as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.build.host_record import Recorded

# A candidate measured this much slower than the winner is left out: effort="default" promises
# an engine within 5% of the one effort="max" picks, and the record is an interleaved timing
# (a few percent of noise). At 1.10, ONNX Runtime recorded at 1.05-1.09x OpenVINO on MiniLM
# and BERT-base was rebuilt on every compile, 10-15 s each time, and lost every time.
SKIP_FACTOR = 1.05


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
                for name in names if name in recorded and recorded[name].factor >= SKIP_FACTOR}
    if len(left_out) == len(names):  # a record cannot rule out everything; the least slow stays
        keep = min(names, key=lambda n: recorded[n].factor)
        del left_out[keep]
    return CandidatePlan("measure", tuple(n for n in names if n not in left_out), left_out)


def _fastest_predicted(names: tuple[str, ...], recorded: dict[str, Recorded]) -> CandidatePlan:
    """Recorded winners first, then candidates never measured here (in preference order), then
    recorded losers, slowest last."""
    def rank(item):
        index, name = item
        if name not in recorded:
            return (1, 0.0, index)
        factor = recorded[name].factor
        return (0 if factor < SKIP_FACTOR else 2, factor, index)

    order = tuple(name for _, name in sorted(enumerate(names), key=rank))
    first = order[0]
    if first in recorded:
        why = f"{first} was predicted to win: {recorded[first].describe()}"
    else:
        why = f"{first} is the device's first preference (this host has no measurement for a graph of this kind yet)"
    return CandidatePlan("prefer", order, fallback=True, why_first=f"effort='fast' builds one candidate; {why}")
