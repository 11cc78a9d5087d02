"""What optimize() does around precision: read calibration data into the compiled input
layout, wrap the budget's metric, and write the plan and its measured cost into the report."""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.utils._pytree as pytree

from kiln.errors import InputMismatch, OptionsError
from kiln.frontend.capture import Captured
from kiln.frontend.input_spec import check_call, normalize_call
from kiln.options import CompileOptions
from kiln.ir import LAYER_META, LayerPlan, PrecisionPlan, Scheme
from kiln.report import Report
from kiln.types import Precision

UNPROVEN = ("layers were lowered without calibration data: their accuracy budget was measured on the example inputs only, "
            "so it is unproven on other real inputs; pass calibration=[...] with real samples")
COST = "; measured cost"


class UnprovenAccuracyWarning(UserWarning):
    """Layers were lowered without calibration data: accuracy rests on the example inputs."""


def flat_calibration(captured: Captured, opts: CompileOptions) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Each calibration sample checked against the compiled input spec, as flat tensors."""
    flat = []
    for index, sample in enumerate(opts.calibration or ()):
        try:
            args, kwargs = normalize_call(sample, None)
            flat.append(tuple(check_call(captured.input_spec, args, kwargs)))
        except Exception as exc:  # CaptureError/InputMismatch say what; the index says which sample
            what = getattr(exc, "what", str(exc))
            raise OptionsError(f"calibration sample {index} does not match the example inputs: {what}",
                               where=f"options.calibration[{index}]",
                               fix="give samples shaped like example_inputs (declare varying sizes with dynamic=...); "
                                   "a loader yielding (inputs, labels) needs a wrapper yielding inputs only") from None
    return tuple(flat)


def metric_score(captured: Captured, opts: CompileOptions):
    """score(flat_fn) -> the budget's metric over its dataset, with flat_fn called like the model."""
    budget = opts.accuracy_budget
    if budget.metric is None:
        return None
    treespec = pytree.treespec_loads(captured.output_structure)
    nones = set(captured.output_none_positions)

    def score(flat_fn) -> float:
        def predict(*args, **kwargs):
            tensors = check_call(captured.input_spec, args, kwargs)
            with torch.no_grad():
                outs = iter(flat_fn(*tensors))
            leaves = [None if i in nones else next(outs) for i in range(treespec.num_leaves)]
            return pytree.tree_unflatten(leaves, treespec)
        try:
            return float(budget.metric(predict, budget.dataset))
        except InputMismatch as exc:
            raise OptionsError(f"the budget's dataset does not match the example inputs: {exc.what}",
                               where="accuracy_budget.dataset", fix="give dataset items shaped like example_inputs") from None
    return score


def record_plan(plan, opts: CompileOptions, report: Report, calibrated: bool) -> None:
    """The per-layer table, what was requested and chosen, and the calibration warning."""
    _eager_runs_fp32(plan)
    layers = [layer for partition in plan.partitions for layer in partition.graph.precision.layers]
    # the per-channel bias corrections are the lowering's business; the table notes them in the reason
    report.precision = [{k: v for k, v in layer.to_dict().items() if k != "bias_shift"} for layer in layers]
    lowered = [layer for layer in layers if layer.precision is not Precision.FP32]
    requested = opts.precision.value
    schemes = sorted({layer.scheme for layer in lowered})
    if lowered:
        report.precision_summary = (f"precision={requested}: {', '.join(schemes)} for {len(lowered)} of {len(layers)} layers "
                                    f"within the budget ({opts.accuracy_budget.describe()}); the rest fp32")
    else:
        report.precision_summary = f"precision={requested}: every layer fp32" + (f" ({len(layers)} weighted layers)" if layers else "")
    if not opts.auto and opts.precision is not Precision.FP32 and len(lowered) < len(layers):
        report.notes.append(f"precision={requested} was requested; {len(layers) - len(lowered)} of {len(layers)} layers stay fp32 "
                            "(see the precision table for each reason)")
    if lowered and not calibrated:
        report.notes.append(UNPROVEN)
        warnings.warn(UNPROVEN, UnprovenAccuracyWarning, stacklevel=3)


def _eager_runs_fp32(plan) -> None:
    """A lowered layer that placement left to eager PyTorch (no backend runs it at its
    precision) computes in fp32 there: its plan says so, rather than claim a precision it
    does not run at."""
    from kiln.ir import EAGER

    for partition in plan.partitions:
        graph = partition.graph
        if partition.placed_backend != EAGER or not graph.precision.lowered:
            continue
        graph.precision.layers[:] = [
            layer if layer.scheme == Scheme.FP32 else
            layer.at_fp32(f"runs eagerly in PyTorch at fp32: no tried backend runs this layer at {layer.scheme}")
            for layer in graph.precision.layers]


def warn_again(report: Report) -> None:
    """A cached build lowered without calibration data is as unproven as when it was built."""
    if UNPROVEN in report.notes:
        warnings.warn(UNPROVEN, UnprovenAccuracyWarning, stacklevel=3)


def record_cost(checks, compiled, captured: Captured, opts: CompileOptions, report: Report) -> None:
    """What the lowered layers cost in accuracy, measured on the built model; the metric too."""
    report.precision_summary = report.precision_summary.split(COST)[0]  # a cache hit measures again
    checks = [c for c in checks if c.on_budget]  # random draws are held to the precision's tolerance instead
    if checks:
        worst_cos = min(c.cosine for c in checks)
        worst_rel = max(c.rel_error for c in checks)
        report.precision_summary += f"{COST}: worst cosine {worst_cos:.6f}, worst rel. error {worst_rel:.3g}"
    budget = opts.accuracy_budget
    if budget.metric is None:
        return
    score = metric_score(captured, opts)
    eager = score(lambda *flat: tuple(captured.gm(*flat)))
    built = score(lambda *flat: tuple(compiled.run_flat(flat)))
    report.precision_summary += f"; {getattr(budget.metric, '__name__', 'metric')} {built:.4g} (eager {eager:.4g})"
    if eager - built > budget.max_metric_drop:
        from kiln.errors import VerificationError

        raise VerificationError(f"the compiled model's metric dropped by {eager - built:.4g} ({eager:.4g} -> {built:.4g}), "
                                f"more than the budget's {budget.max_metric_drop:g}",
                                where=f"model {report.model}", fix="loosen max_metric_drop, or use precision='fp32'")


def lowest_precision(report: Report) -> Precision:
    return PrecisionPlan([LayerPlan.from_dict(row) for row in report.precision]).lowest()


def back_to_fp32(gm, reason: str) -> int:
    """Put every lowered layer of `gm` back to fp32 with `reason`; returns how many were lowered."""
    from kiln.types import NodeDecision

    count = len(_lowered_layers(gm))
    for node in gm.graph.nodes:
        _to_fp32(node, reason)
        decision = node.meta.get("kiln")
        if isinstance(decision, NodeDecision) and decision.precision is not Precision.FP32:
            node.meta["kiln"] = dataclasses.replace(decision, precision=Precision.FP32, reasons=(reason,))
    return count


def raise_most_sensitive(gm, share: float, reason: str) -> int:
    """Put the most sensitive `share` of `gm`'s lowered layers (by the error each caused alone)
    back to fp32 with `reason`, at least one; returns how many went back."""
    lowered = sorted(_lowered_layers(gm), key=lambda node: -(node.meta[LAYER_META].error or 0.0))
    chosen = lowered[:max(1, math.ceil(share * len(lowered)))] if lowered else []
    for node in chosen:
        _to_fp32(node, reason)
    return len(chosen)


def _lowered_layers(gm) -> list:
    return [node for node in gm.graph.nodes
            if (layer := node.meta.get(LAYER_META)) is not None and layer.scheme != Scheme.FP32]


def _to_fp32(node, reason: str) -> None:
    from kiln.types import NodeDecision

    layer = node.meta.get(LAYER_META)
    if layer is None or layer.scheme == Scheme.FP32:
        return
    node.meta[LAYER_META] = layer.at_fp32(reason)
    decision = node.meta.get("kiln")
    if isinstance(decision, NodeDecision) and decision.precision is not Precision.FP32:
        node.meta["kiln"] = dataclasses.replace(decision, precision=Precision.FP32, reasons=(reason,))
