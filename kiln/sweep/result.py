"""What a sweep found: one SweepPoint per setting, the Pareto front over them, and the forms
people and programs read it in (a text table, a JSON-safe dict, the curve as a PNG).

A point is on the front when no other built point is at least as fast and at least as accurate
and strictly better in one of the two: those are the only settings worth picking.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from kiln.errors import KilnError, OptionsError


@dataclass
class SweepPoint:
    index: int
    setting: str  # the setting's text form (kiln.sweep.Setting.parse reads it back)
    label: str
    status: str = "built"  # built | failed
    reason: str = ""  # why a point failed, or what was chosen for it
    precision_summary: str = ""  # what the precision search chose (the compile report's summary)
    backends: dict[str, str] = field(default_factory=dict)  # partition -> backend
    build_seconds: float = 0.0
    parameters: int | None = None  # of the model built (after pruning)
    prune: str = ""  # the pruner's own description, for a pruned point
    median_ms: float | None = None  # timed interleaved with every other point and eager
    p99_ms: float | None = None
    speedup_vs_eager: float | None = None  # eager's median / this point's median
    cosine_min: float | None = None  # worst cosine to eager over outputs, rows and evaluated inputs
    rel_error_max: float | None = None
    score: float | None = None  # the user's metric on this point (None without metric=)
    accuracy: float | None = None  # what the curve plots: the score, else cosine_min
    on_front: bool = False
    artifact: str | None = None  # the saved artifact's path (output_dir= given)

    @property
    def built(self) -> bool:
        return self.status == "built"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (latency, accuracy) pairs no other pair dominates: none other is at least
    as fast and at least as accurate while strictly better in one. Equal pairs are all kept."""
    front = []
    for i, (latency, accuracy) in enumerate(points):
        dominated = any(other_l <= latency and other_a >= accuracy and (other_l < latency or other_a > accuracy)
                        for j, (other_l, other_a) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


@dataclass
class SweepResult:
    model: str
    profile: str
    points: list[SweepPoint]
    accuracy_name: str  # the metric's name, or "cosine to eager"
    eager_ms: float | None = None
    eager_p99_ms: float | None = None
    reference_score: float | None = None  # the metric on eager PyTorch
    evaluated_inputs: int = 0  # inputs cosine was measured on: the example and the dataset's
    notes: list[str] = field(default_factory=list)
    compiled: dict[int, Any] = field(default_factory=dict, repr=False)  # index -> CompiledModel, in memory only

    def mark_front(self) -> None:
        built = [p for p in self.points if p.built and p.median_ms is not None and p.accuracy is not None]
        chosen = pareto_front([(p.median_ms, p.accuracy) for p in built])
        for i, point in enumerate(built):
            point.on_front = i in chosen

    @property
    def front(self) -> list[SweepPoint]:
        """The front's points, fastest first."""
        return sorted((p for p in self.points if p.on_front), key=lambda p: p.median_ms)

    def pick(self, index: int):
        """The compiled model of point `index` (as built in this process; its artifact is at .artifact)."""
        point = self._point(index)
        if index not in self.compiled:
            raise OptionsError(f"point {index} ({point.label}) has no compiled model: {point.status} {point.reason}",
                               where="sweep.pick", fix=f"pick a built point: {', '.join(str(i) for i in self.compiled)}")
        return self.compiled[index]

    def artifact_of(self, index: int) -> Path:
        """Where point `index`'s artifact was saved (the sweep ran with output_dir=)."""
        point = self._point(index)
        if point.artifact is None:
            raise OptionsError(f"point {index} ({point.label}) has no artifact"
                               + (f": {point.status} ({point.reason})" if not point.built else " (no output_dir was given)"),
                               where="sweep.pick", fix="pick a built point of a sweep run with output_dir= (kiln sweep -o DIR)")
        return Path(point.artifact)

    def _point(self, index: int) -> SweepPoint:
        for point in self.points:
            if point.index == index:
                return point
        raise OptionsError(f"no point {index} in this sweep", where="sweep.pick",
                           fix=f"points are numbered {self.points[0].index}..{self.points[-1].index}" if self.points else "")

    def to_dict(self, this_point: int | None = None) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("points", "compiled")}
        data["points"] = [asdict(p) for p in self.points]  # asdict(self) would deep-copy the engines too
        data["front"] = [p.index for p in self.front]
        if this_point is not None:
            data["this_point"] = this_point
        return json.loads(json.dumps(data, default=_finite))  # JSON-safe now, not at the reader's end

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "SweepResult":
        fields = {k: v for k, v in data.items() if k not in ("front", "this_point")}
        fields["points"] = [SweepPoint(**p) for p in data["points"]]
        return cls(**fields)

    def table(self) -> str:
        """A text table, fastest first, the front marked with '*'."""
        accuracy = self.accuracy_name
        header = f"{'':1s} {'#':>2s}  {'setting':28s} {'median ms':>9s} {'p99 ms':>8s} {'x eager':>7s} " \
                 f"{accuracy[:22]:>22s} {'cosine min':>10s}  chosen"
        lines = [f"kiln sweep: {self.model} on {self.profile}, {len(self.points)} settings, timed interleaved "
                 f"with eager PyTorch ({_ms(self.eager_ms)} ms median)", header]
        order = sorted(self.points, key=lambda p: (not p.built, p.median_ms or 0.0))
        for p in order:
            if not p.built:
                lines.append(f"  {p.index:2d}  {p.label:28s} {p.status}: {p.reason}")
                continue
            backends = ", ".join(sorted(set(p.backends.values())))
            lines.append(f"{'*' if p.on_front else ' '} {p.index:2d}  {p.label:28s} {_ms(p.median_ms):>9s} {_ms(p.p99_ms):>8s} "
                         f"{p.speedup_vs_eager or 0:7.2f} {p.accuracy:22.6g} {p.cosine_min:10.6f}  "
                         f"{backends}; {p.precision_summary or 'fp32'}")
        if self.reference_score is not None:
            lines.append(f"eager PyTorch {accuracy}: {self.reference_score:.6g}")
        lines.append(f"* on the Pareto front (no other point is as fast and as accurate); cosine over "
                     f"{self.evaluated_inputs} inputs, every output and row")
        lines += [f"artifact #{p.index}: {p.artifact}" for p in self.points if p.artifact]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        from kiln.sweep.plot import draw

        return draw(self, Path(path))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    raise KilnError(f"a sweep result holds {type(value).__name__}, which JSON cannot carry", where="SweepResult.to_dict")
