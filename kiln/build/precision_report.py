"""The report's precision section: the per-layer table, what was requested and chosen, the
calibration warning, and what the lowered layers cost, measured on the built model."""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from dataclasses import replace

from kiln.errors import UnprovenAccuracyWarning, VerificationError
from kiln.frontend.capture import Captured
from kiln.frontend.moe_op import EXPERT_TYPES
from kiln.ir import EAGER, LayerPlan, PartitionPlan, PrecisionPlan, Scheme
from kiln.options import CompileOptions
from kiln.passes.assign_precision import KEPT_BY_USER
from kiln.report import Report
from kiln.types import Precision

UNPROVEN = ("layers were lowered without calibration data: their accuracy budget was measured on the example inputs only, "
            "so it is unproven on other real inputs; pass calibration=[...] with real samples")
COST = "; measured cost"


def record_plan(plan: PartitionPlan, opts: CompileOptions, report: Report, calibrated: bool) -> None:
    """The per-layer table, what was requested and chosen, and the calibration warning."""
    _eager_runs_fp32(plan)
    layers = [layer for partition in plan.partitions for layer in partition.graph.precision.layers]
    # the per-channel bias corrections are the lowering's business; the table notes them in the reason
    report.precision = [layer.report_row() for layer in layers]
    lowered = [layer for layer in layers if layer.precision is not Precision.FP32]
    requested = opts.precision.value
    counts = Counter(str(layer.scheme) for layer in lowered)
    if len(counts) == 1:
        report.precision_summary = (f"precision={requested}: {next(iter(counts))} for {len(lowered)} of {len(layers)} layers "
                                    f"within the budget ({opts.accuracy_budget.describe()}); the rest fp32")
    elif counts:  # a mix: int8 where it fits, bf16 for the layers int8 would not keep within the budget
        mix = " and ".join(f"{scheme} for {count}" for scheme, count in counts.most_common())
        report.precision_summary = (f"precision={requested}: {mix} of {len(layers)} layers within the budget "
                                    f"({opts.accuracy_budget.describe()})" + ("; the rest fp32" if len(lowered) < len(layers) else ""))
    else:
        report.precision_summary = f"precision={requested}: every layer fp32" + (f" ({len(layers)} weighted layers)" if layers else "")
    if not opts.auto and opts.precision is not Precision.FP32 and len(lowered) < len(layers):
        report.notes.append(f"precision={requested} was requested; {len(layers) - len(lowered)} of {len(layers)} layers stay fp32 "
                            "(see the precision table for each reason)")
    if lowered and not calibrated:
        report.notes.append(UNPROVEN)
    if opts.sparsity is not None:
        sparse = [layer for layer in layers if layer.sparsity]
        report.precision_summary += (f"; sparsity={opts.sparsity}: {len(sparse)} of {len(layers)} layers pruned "
                                     f"to {opts.sparsity} (see each layer's sparsity reason)")


def _warn_user(text: str) -> None:
    """Warn at the user's own line (the first frame outside kiln), however deep kiln called from."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "kiln":
        frame, level = frame.f_back, level + 1
    warnings.warn(text, UnprovenAccuracyWarning, stacklevel=level)


def _eager_runs_fp32(plan: PartitionPlan) -> None:
    """A lowered layer that placement left to eager PyTorch (no backend runs it at its
    precision) computes in fp32 there: its plan says so, rather than claim a precision it
    does not run at. The exception is an experts node at bf16, which the eager partition lowers
    (kiln.backends.eager)."""
    for partition in plan.partitions:
        graph = partition.graph
        if partition.placed_backend != EAGER or not graph.precision.lossy:
            continue
        # eager partitions run the captured weights as they are: neither rounded nor pruned
        graph.precision.layers[:] = [
            (layer if layer.scheme == Scheme.FP32 or (layer.op == "experts" and layer.scheme in EXPERT_TYPES) else
             layer.at_fp32(f"runs eagerly in PyTorch at fp32: no tried backend runs this layer at {layer.scheme}"))
            for layer in graph.precision.layers]
        graph.precision.layers[:] = [
            replace(layer, sparsity=None, sparsity_reason="runs eagerly in PyTorch with its dense weight")
            if layer.sparsity else layer for layer in graph.precision.layers]


def warn_if_unproven(report: Report) -> None:
    """Warn when the model kiln returns (a fresh build, or a compile-cache hit, as unproven as
    when it was built) has layers lowered without calibration data."""
    if UNPROVEN in report.notes:
        _warn_user(UNPROVEN)


def check_requested_kept(report: Report, opts: CompileOptions) -> None:
    """An explicit precision must run on at least one layer of what was built (the layers the user
    keeps at fp32 aside): a plan that kept every layer at fp32 (the budget affords none, or no backend runs the layers at it) is an
    error naming why, not an fp32 model returned as if it were the precision asked for."""
    rows = [row for row in report.precision if not row["reason"].startswith(KEPT_BY_USER)]  # the user's own choice
    if opts.auto or opts.precision is Precision.FP32 or not rows:
        return
    if any(LayerPlan.from_dict(row).precision is opts.precision for row in rows):
        return
    reasons = list(dict.fromkeys(row["reason"] for row in rows if row["reason"]))
    raise VerificationError(f"precision={opts.precision.value!r} was requested and no layer of the model runs at it: "
                            f"{'; '.join(reasons[:4]) or 'every layer stayed fp32'}"
                            + (f" (and {len(reasons) - 4} more reasons)" if len(reasons) > 4 else ""),
                            where=f"model {report.model}, {len(report.precision)} weighted layers",
                            fix="loosen accuracy_budget (e.g. kiln.Budget(min_cosine=0.99)), pass calibration data like real "
                                "inputs, use another backend=..., or precision='auto' to let kiln choose per layer")


def record_cost(checks, compiled, captured: Captured, opts: CompileOptions, report: Report, metric_score) -> None:
    """What the lowered layers cost in accuracy, measured on the built model; the metric too
    (`metric_score` as kiln.build.inputs.metric_score makes it, None without a metric)."""
    report.precision_summary = report.precision_summary.split(COST)[0]  # a cache hit measures again
    checks = [c for c in checks if c.on_budget]  # random draws are held to the precision's tolerance instead
    if checks:
        worst_cos = min(c.cosine for c in checks)
        worst_rel = max(c.rel_error for c in checks)
        report.precision_summary += f"{COST}: worst cosine {worst_cos:.6f}, worst rel. error {worst_rel:.3g}"
    budget = opts.accuracy_budget
    if metric_score is None:
        return
    eager = metric_score(lambda *flat: tuple(captured.gm(*flat)))
    built = metric_score(lambda *flat: tuple(compiled.run_flat(flat)))
    report.precision_summary += f"; {getattr(budget.metric, '__name__', 'metric')} {built:.4g} (eager {eager:.4g})"
    if eager - built > budget.max_metric_drop:
        raise VerificationError(f"the compiled model's metric dropped by {eager - built:.4g} ({eager:.4g} -> {built:.4g}), "
                                f"more than the budget's {budget.max_metric_drop:g}",
                                where=f"model {report.model}", fix="loosen max_metric_drop, or use precision='fp32'")


def lowest_precision(report: Report) -> Precision:
    return PrecisionPlan([LayerPlan.from_dict(row) for row in report.precision]).lowest()
