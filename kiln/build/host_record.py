"""What this host measured before: for each kind of graph, each backend's time relative to the
fastest candidate of the compile that measured it, and how long its build took.

The effort setting reads it to leave out candidates that cannot win (effort="default") or to
build only the predicted winner (effort="fast"). It is a small JSON file beside the compile
cache, written after each measured selection. It is never trusted across hosts or versions:
a file written on another CPU, core count, or with another kiln, torch or backend library is
ignored and replaced.

A kind of graph is its set of op types, the precision of its layers and its size in
multiply-adds (powers of two); a graph of the same ops and precision within SIZE_OCTAVES of a
recorded size counts as the same kind, so MiniLM at batch 8 reads what MiniLM at batch 1 ran.

It also keeps precision="auto"'s races: how a lowered plan ran against the model's fp32 build,
per plan (which layer took which scheme) on a kind of graph. effort="default" reads them to skip
the fp32 build and its races where this host measured the same plan clearly faster before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from kiln.host import host_fingerprint, usable_cores
from kiln.ir import LayerPlan, PartitionGraph
from kiln.placement.cost_model import count_flops
from kiln.version import library_versions

log = logging.getLogger("kiln")

RECORD_FILE = "host-record.json"
SIZE_OCTAVES = 4  # a recorded size at most 16x away counts as the same kind of graph
MAX_KINDS = 512  # the oldest kinds are dropped past this, so the file stays small


@dataclass(frozen=True)
class GraphKind:
    ops: tuple[str, ...]  # the op types, sorted
    precision: str  # the layers' precisions, e.g. "fp32" or "bf16+fp32"
    size: int  # log2 of the multiply-adds of one call on the example inputs

    @property
    def family(self) -> str:
        return f"{self.precision}|{','.join(self.ops)}"

    def describe(self) -> str:
        shown = ", ".join(self.ops[:4]) + (f" and {len(self.ops) - 4} more op types" if len(self.ops) > 4 else "")
        return f"{self.precision} graph of {shown}, about 2^{self.size} multiply-adds"


def graph_kind(graph: PartitionGraph) -> GraphKind:
    precisions = "+".join(sorted({layer.scheme.value for layer in graph.precision.layers})) or "fp32"
    return _kind(graph.gm, precisions)


def plan_kind(gm: torch.fx.GraphModule, plans: Mapping[str, LayerPlan]) -> GraphKind:
    """The kind of a whole graph under a precision plan: its "precision" names the plan itself
    (a digest of which layer took which scheme), as two plans of the same schemes can lower
    a few layers or nearly all of them."""
    schemes = sorted({p.scheme.value for p in plans.values()})
    digest = hashlib.sha256(json.dumps(sorted((name, p.scheme.value) for name, p in plans.items())).encode()).hexdigest()
    return _kind(gm, f"plan {'+'.join(schemes)} {digest[:16]}")


def _kind(gm: torch.fx.GraphModule, precision: str) -> GraphKind:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    ops = tuple(sorted({str(n.target).replace("aten.", "").split(".")[0] for n in nodes}))
    flops = sum(count_flops(gm, n) for n in nodes)
    return GraphKind(ops, precision, int(round(math.log2(max(flops / 2, 1.0)))))


@dataclass(frozen=True)
class RecordedRace:
    """A lowered plan's last race against fp32 on a kind of graph."""

    lowered_ms: float
    fp32_ms: float
    when: str
    size: int

    @property
    def fp32_factor(self) -> float:
        """fp32's time over the lowered plan's: above 1, the plan won."""
        return self.fp32_ms / self.lowered_ms

    def describe(self) -> str:
        return (f"on this host this plan ran {self.lowered_ms:.2f} ms against fp32's {self.fp32_ms:.2f} ms "
                f"({self.fp32_factor:.2f}x) on a graph of this kind (measured {self.when})")


@dataclass(frozen=True)
class Recorded:
    """One backend's last measurement on a kind of graph."""

    backend: str
    factor: float  # its median over the fastest candidate's median in that compile (1.0: it won)
    median_ms: float
    build_seconds: float
    when: str  # ISO date of the measurement
    size: int  # the recorded graph's size, log2 multiply-adds
    apart: bool = False  # that timing put it behind the fastest beyond the noise

    def describe(self) -> str:
        behind = ", behind it beyond the noise" if self.apart else ""
        return (f"on this host it ran {self.factor:.2f}x the fastest candidate's time{behind} on a graph of this kind "
                f"(measured {self.when}, built in {self.build_seconds:.1f} s)")


class HostRecord:
    def __init__(self, path: Path | None):
        self.path = path
        self._data = self._read() if path is not None else self._empty()

    @classmethod
    def beside(cls, cache_root: Path) -> "HostRecord":
        return cls(Path(cache_root) / RECORD_FILE)

    @staticmethod
    def _identity() -> dict:
        return {"host": host_fingerprint(), "cores": usable_cores(), "versions": library_versions()}

    def _empty(self) -> dict:
        return {"identity": self._identity(), "kinds": {}, "races": {}}

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return self._empty()
        if not isinstance(data, dict) or data.get("identity") != self._identity() or not isinstance(data.get("kinds"), dict):
            return self._empty()  # another host or other versions: nothing in it applies here
        if not isinstance(data.get("races"), dict):
            data["races"] = {}  # a record written before races were kept
        return data

    def lookup(self, kind: GraphKind) -> dict[str, Recorded]:
        """backend -> its measurement on the nearest recorded size of `kind`'s family."""
        found = _nearest(self._data["kinds"].get(kind.family, {}), kind.size)
        if found is None:
            return {}
        size, entry = found
        return {name: Recorded(name, m["factor"], m["median_ms"], m["build_seconds"], m["when"], size, bool(m.get("apart")))
                for name, m in entry.items()}

    def lookup_race(self, kind: GraphKind) -> RecordedRace | None:
        """The last race of `kind`'s plan against fp32, at the nearest recorded size."""
        found = _nearest(self._data["races"].get(kind.family, {}), kind.size)
        if found is None:
            return None
        size, race = found
        return RecordedRace(race["lowered_ms"], race["fp32_ms"], race["when"], size)

    def store_race(self, kind: GraphKind, lowered_ms: float, fp32_ms: float) -> None:
        """Record how `kind`'s plan ran against fp32 (median ms of each, timed interleaved)."""
        if self.path is None:
            return
        self._data = self._read()  # what other records (another compile, or this one's selections) wrote since
        races = self._data["races"]
        races.setdefault(kind.family, {})[str(kind.size)] = {
            "lowered_ms": round(lowered_ms, 4), "fp32_ms": round(fp32_ms, 4), "when": time.strftime("%Y-%m-%d")}
        while len(races) > MAX_KINDS:
            races.pop(next(iter(races)))
        self._write()

    def store(self, kind: GraphKind, measured: dict[str, tuple[float, float]], apart: frozenset[str] = frozenset()) -> None:
        """Record one selection: backend -> (median ms, build seconds), two or more timed together;
        `apart`: the backends that timing put behind the fastest beyond the noise."""
        if len(measured) < 2 or self.path is None:
            return
        best = min(ms for ms, _ in measured.values())
        when = time.strftime("%Y-%m-%d")
        self._data = self._read()  # what other records (another compile, or this one's races) wrote since
        family = self._data["kinds"].setdefault(kind.family, {})
        entry = family.setdefault(str(kind.size), {})
        for name, (ms, seconds) in measured.items():
            entry[name] = {"factor": round(ms / best, 4), "median_ms": round(ms, 4), "build_seconds": round(seconds, 2),
                           "when": when, "apart": name in apart}
        family[str(kind.size)] = entry
        kinds = self._data["kinds"]
        while len(kinds) > MAX_KINDS:
            kinds.pop(next(iter(kinds)))
        self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, staging = tempfile.mkstemp(prefix=".host-record-", dir=self.path.parent)
            with os.fdopen(fd, "w") as out:
                json.dump(self._data, out, indent=1, sort_keys=True)
            os.replace(staging, self.path)
        except OSError as exc:  # the record only saves time; a compile never fails for it
            log.warning("could not write %s: %s", self.path, exc)


def _nearest(sizes: dict[str, dict], size: int) -> tuple[int, dict] | None:
    """(size, entry) of the recorded size nearest `size` within SIZE_OCTAVES (the larger on a tie)."""
    near = [int(s) for s in sizes if abs(int(s) - size) <= SIZE_OCTAVES]
    if not near:
        return None
    nearest = min(near, key=lambda s: (abs(s - size), -s))
    return nearest, sizes[str(nearest)]
