"""The compile report: every pass, every backend decision and its reason, verification, timings.

Plain data with `to_dict`/`from_dict` (it travels in the artifact's manifest) and `render()`
for people (`kiln inspect`, `print(compiled.report)`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

_FIGURE = re.compile(r"(\d+(?:\.\d+)?) (us|GB)")
_FIGURE_SLOT = "\0 \\2"  # a NUL marks where a figure was: no reason text holds one


def _fill_figures(template: str, figures: list[list[float]]) -> str:
    """Put back a grouped reason's figures: the one value, or the range over the group's nodes."""
    parts = template.split("\x00")
    out = [parts[0]]
    for slot, rest in enumerate(parts[1:]):
        values = [f[slot] for f in figures if slot < len(f)]
        low, high = min(values), max(values)
        out.append(f"{low:g}" if low == high else f"{low:g}-{high:g}")
        out.append(rest)
    return "".join(out)


@dataclass
class PassRecord:
    name: str
    stage: str
    changed: bool
    counts: dict[str, int]
    skipped: list[tuple[str, str]]  # (node, reason)
    seconds: float
    annotated: int = 0  # nodes whose decision a decide-only pass wrote


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
    estimated_ms: float | None = None  # kiln's cost model, transfers in included
    measured_ms: float | None = None  # median of the built engine on the example inputs


@dataclass
class Report:
    model: str
    profile: str
    inputs: str
    outputs: list[str] = field(default_factory=list)
    captured_ops: int = 0  # op nodes in the captured graph, before any pass
    passes: list[PassRecord] = field(default_factory=list)
    candidates: list[CandidateRecord] = field(default_factory=list)
    partitions: list[PartitionRecord] = field(default_factory=list)
    verification: list[dict] = field(default_factory=list)  # verify.OutputCheck dicts, worst draw per output
    verified_draws: int = 0  # inputs checked besides the example: random draws, then calibration samples
    verified_calibration: int = 0  # how many of those were the user's calibration samples
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    notes: list[str] = field(default_factory=list)
    # one record per op node: node, op, partition, device, backend, precision, est_us, inputs, reasons
    placement: list[dict] = field(default_factory=list)
    precision: list[dict] = field(default_factory=list)  # precision.plan.LayerPlan dicts, one per weighted layer
    precision_summary: str = ""  # what was requested and chosen, and the accuracy it cost
    # one dict per mixture-of-experts block (kiln.frontend.moe.MoeBlock.to_dict): the static form
    # captured, and the tokens each expert received on the example inputs
    experts: list[dict] = field(default_factory=list)
    # kiln.sweep's curve when this artifact is one of its points: every point's settings, latency and
    # accuracy, the Pareto front, and "this_point" (kiln.sweep.SweepResult.to_dict); {} otherwise
    sweep: dict = field(default_factory=dict)

    @property
    def lowered(self) -> bool:
        """Whether any layer runs below fp32 or has pruned weights (verification then answers to
        the budget)."""
        return any(row["scheme"] != "fp32" or row.get("sparsity") for row in self.precision)

    def to_dict(self) -> dict:
        return asdict(self)

    def render_partitions(self) -> list[str]:
        lines = []
        for part in self.partitions:
            top = ", ".join(f"{op} {n}" for op, n in sorted(part.ops.items(), key=lambda kv: -kv[1])[:6])
            times = [f"est. {part.estimated_ms:.3f} ms" if part.estimated_ms is not None else "",
                     f"measured {part.measured_ms:.3f} ms" if part.measured_ms is not None else ""]
            figures = ", ".join(t for t in times if t)
            lines.append(f"  {part.name}: {part.nodes} ops on {part.device} via {part.backend}"
                         + (f"  [{figures}]" if figures else "") + f"  ({top})")
        return lines

    def render_placement(self, limit: int = 12) -> list[str]:
        """Placement decisions worth reading: every node that is pinned, falls back to eager,
        did not fit, or could not run somewhere; then a count of the rest."""
        if not self.placement:
            return []
        lines = ["", "Placement (why each node runs where it does)"]
        notable = [r for r in self.placement if any(w in reason for reason in r["reasons"]
                                                    for w in ("pinned", "eager", "doesn't fit", "kept with", "not on"))]
        # Decisions that differ only in their figures form one group; the group shows each figure's range.
        by_reason: dict[str, list[str]] = {}
        figures: dict[str, list[list[float]]] = {}
        for record in notable:
            own = f"on {record['device']} via"
            why = "; ".join(r for r in record["reasons"] if not r.startswith(("cheaper here", own, "planned at")))
            key = f"{record['device']} via {record['backend']}: {_FIGURE.sub(_FIGURE_SLOT, why)}"
            by_reason.setdefault(key, []).append(record["node"])
            figures.setdefault(key, []).append([float(m.group(1)) for m in _FIGURE.finditer(why)])
        for key, nodes in list(by_reason.items())[:limit]:
            shown = ", ".join(nodes[:4]) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")
            lines.append(f"  {shown} -> {_fill_figures(key, figures[key])}")
        if len(by_reason) > limit:
            lines.append(f"  ... and {len(by_reason) - limit} more groups of decisions (kiln inspect --json lists all)")
        rest = len(self.placement) - len(notable)
        if rest:
            lines.append(f"  {rest} other nodes: on the device where they were estimated cheapest, every device able to run them")
        return lines

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
                 f"  outputs: {', '.join(self.outputs)}", ""]
        after = sum(p.nodes for p in self.partitions)
        lines.append(f"Passes ({self.captured_ops} ops captured -> {after} after passes)" if self.captured_ops
                     else "Passes")
        for p in self.passes:
            counts = ", ".join(f"{k} {v}" for k, v in p.counts.items() if v) or "no change"
            if p.annotated:
                counts += f"; decided {p.annotated} nodes"
            lines.append(f"  {p.stage:9s} {p.name:31s} {counts}  ({p.seconds * 1000:.0f} ms)")
            for node, reason in p.skipped[:5]:
                lines.append(f"  {'':9s} {'':31s} skipped {node}: {reason}")
            if len(p.skipped) > 5:
                lines.append(f"  {'':9s} {'':31s} ... and {len(p.skipped) - 5} more skips")
        lines += self._precision_lines()
        lines += self._expert_lines()
        lines += ["", "Partitions"] + self.render_partitions()
        lines += self.render_placement()
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
        random_draws = self.verified_draws - self.verified_calibration
        checked = "example inputs" + (f" + {random_draws} random draws" if random_draws else "")
        if self.verified_calibration:
            checked += f" + {self.verified_calibration} calibration samples"
        if random_draws and any(v.get("on_budget") for v in self.verification):
            checked += f"; the budget on the example inputs{' and calibration samples' if self.verified_calibration else ''}, " \
                       "the random draws at the precision's tolerance"
        lines += ["", f"Verification against eager ({checked})"]
        if not self.verification:
            lines.append("  not verified")
        for v in self.verification:
            verdict = "ok" if v["ok"] else "FAILED"
            lines.append(f"  {v['name']:28s} max abs err {v['max_abs_error']:.3g}, cosine {v['cosine']:.6f}, "
                         f"rel. err {v.get('rel_error', 0.0):.3g}  {verdict}")
        lines += self._sweep_lines()
        lines += ["", "Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items())]
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _expert_lines(self) -> list[str]:
        if not self.experts:
            return []
        lines = ["", "Mixture of experts (tokens routed to each expert on the example inputs)"]
        for block in self.experts:
            form = f"{block['form']} form" if block["form"] else f"kept its own forward: {block['refusal']}"
            load = " ".join(str(n) for n in block["load"])
            lines.append(f"  {block['block']:28s} {block['experts']} experts, top-{block['top_k']}, {form}")
            if block["load"]:
                lines.append(f"  {'':28s} load [{load}] over {block['tokens']} tokens")
        return lines

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
        return lines + self.render_sparsity()

    def render_sparsity(self) -> list[str]:
        """One line per weighted layer that assign_sparsity decided on: 2:4 or dense, and why."""
        rows = [row for row in self.precision if row.get("sparsity_reason")]
        if not rows:
            return []
        pruned = sum(1 for row in rows if row.get("sparsity"))
        lines = ["", f"Sparsity ({pruned} of {len(rows)} weighted layers pruned to 2:4)"]
        for row in rows:
            state = f"{row['sparsity']} at {row['scheme']}" if row.get("sparsity") else f"dense at {row['scheme']}"
            lines.append(f"  {row['node']}: {state}: {row['sparsity_reason'].removeprefix('kept dense: ')}")
        return lines

    def _sweep_lines(self) -> list[str]:
        """Where this artifact sits on the sweep it came from (the curve itself: kiln inspect --html)."""
        if not self.sweep:
            return []
        points, mine = self.sweep.get("points", []), self.sweep.get("this_point")
        lines = ["", f"Sweep ({len(points)} points; latency against {self.sweep.get('accuracy_name', 'accuracy')})"]
        for point in points:
            if point.get("status") != "built":
                lines.append(f"    #{point['index']} {point['label']}: {point.get('status')} ({point.get('reason', '')})")
                continue
            marks = ("this artifact" if point["index"] == mine else "", "on the Pareto front" if point.get("on_front") else "")
            lines.append(f"  {'>' if point['index'] == mine else ' '} #{point['index']} {point['label']}: "
                         f"{point['median_ms']:.3f} ms, {self.sweep.get('accuracy_name', 'accuracy')} {point['accuracy']:.6g}"
                         + (f"  [{', '.join(m for m in marks if m)}]" if any(marks) else ""))
        return lines
