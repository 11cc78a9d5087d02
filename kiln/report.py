"""The compile report: every pass, every backend decision and its reason, verification, timings.

Plain data with `to_dict`/`from_dict` (it travels in the artifact's manifest) and `render()`
for people (`kiln inspect`, `print(compiled.report)`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PassRecord:
    name: str
    stage: str
    changed: bool
    counts: dict[str, int]
    skipped: list[tuple[str, str]]  # (node, reason)
    seconds: float


@dataclass
class CandidateRecord:
    """One backend considered for one partition."""

    partition: str
    backend: str
    status: str  # chosen | slower | unavailable | unsupported | failed | mismatch | not tried
    reason: str = ""
    compile_seconds: float | None = None
    median_ms: float | None = None
    max_abs_error: float | None = None
    detail: str = ""  # what the backend did inside its engine (fused ops, kernels)


@dataclass
class PartitionRecord:
    name: str
    device: str
    backend: str
    nodes: int
    ops: dict[str, int]  # aten op -> count


@dataclass
class Report:
    model: str
    profile: str
    inputs: str
    outputs: list[str] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    candidates: list[CandidateRecord] = field(default_factory=list)
    partitions: list[PartitionRecord] = field(default_factory=list)
    verification: list[dict] = field(default_factory=list)  # verify.OutputCheck dicts, worst draw per output
    verified_draws: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    notes: list[str] = field(default_factory=list)
    precision: list[dict] = field(default_factory=list)  # precision.plan.LayerPlan dicts, one per weighted layer
    precision_summary: str = ""  # what was requested and chosen, and the accuracy it cost

    @property
    def lowered(self) -> bool:
        """Whether any layer runs below fp32 (verification then answers to the budget)."""
        return any(row["scheme"] != "fp32" for row in self.precision)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        data = dict(data)
        data["passes"] = [PassRecord(**{**p, "skipped": [tuple(s) for s in p["skipped"]]}) for p in data.get("passes", [])]
        data["candidates"] = [CandidateRecord(**c) for c in data.get("candidates", [])]
        data["partitions"] = [PartitionRecord(**p) for p in data.get("partitions", [])]
        return cls(**data)

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        lines = [f"kiln report: {self.model} for profile {self.profile}", f"  inputs:  {self.inputs}",
                 f"  outputs: {', '.join(self.outputs)}", "", "Passes"]
        for p in self.passes:
            counts = ", ".join(f"{k} {v}" for k, v in p.counts.items() if v) or "no change"
            lines.append(f"  {p.stage:9s} {p.name:24s} {counts}  ({p.seconds * 1000:.0f} ms)")
            for node, reason in p.skipped[:5]:
                lines.append(f"  {'':9s} {'':24s} skipped {node}: {reason}")
            if len(p.skipped) > 5:
                lines.append(f"  {'':9s} {'':24s} ... and {len(p.skipped) - 5} more skips")
        lines += self._precision_lines()
        lines += ["", "Partitions"]
        for part in self.partitions:
            top = ", ".join(f"{op} {n}" for op, n in sorted(part.ops.items(), key=lambda kv: -kv[1])[:6])
            lines.append(f"  {part.name}: {part.nodes} ops on {part.device} via {part.backend}  ({top})")
        lines += ["", "Backend decisions"]
        for c in self.candidates:
            figures = []
            if c.compile_seconds is not None:
                figures.append(f"build {c.compile_seconds:.1f} s")
            if c.median_ms is not None:
                figures.append(f"median {c.median_ms:.2f} ms")
            if c.max_abs_error is not None:
                figures.append(f"max err {c.max_abs_error:.2g}")
            text = f"  {c.partition}: {c.backend:12s} {c.status:11s}"
            if figures:
                text += " " + ", ".join(figures)
            if c.reason:
                text += f"  -- {c.reason}"
            lines.append(text)
            if c.detail:
                lines.append(f"  {'':4s}{'':12s} {c.detail}")
        lines += ["", f"Verification against eager (example inputs + {self.verified_draws} more: random draws, calibration samples)"]
        if not self.verification:
            lines.append("  not verified")
        for v in self.verification:
            verdict = "ok" if v["ok"] else "FAILED"
            lines.append(f"  {v['name']:28s} max abs err {v['max_abs_error']:.3g}, cosine {v['cosine']:.6f}, "
                         f"rel. err {v.get('rel_error', 0.0):.3g}  {verdict}")
        lines += ["", "Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())]
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _precision_lines(self) -> list[str]:
        if not self.precision and not self.precision_summary:
            return []
        lines = ["", "Precision"]
        if self.precision_summary:
            lines.append(f"  {self.precision_summary}")
        if self.precision:
            lines.append(f"  {'layer':24s} {'op':7s} {'scheme':13s} {'error alone':>11s}  reason")
        for row in self.precision:
            lines.append(f"  {row['node']:24s} {row['op']:7s} {row['scheme']:13s} {row['error']:11.3g}  {row['reason']}")
        return lines
