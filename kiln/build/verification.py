"""The compiled model against eager PyTorch, end to end: the example outputs captured with the
graph, then the user's model called afresh on every other draw (random draws and calibration
samples). Fresh builds and compile-cache hits answer to this same check."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from kiln.build import precision_report
from kiln.errors import KilnError, VerificationError
from kiln.frontend.capture import Captured, plain_containers
from kiln.frontend.input_spec import check_call, rebuild_call
from kiln.options import CompileOptions
from kiln.report import Report
from kiln.verify import failures_text, worst_checks


def verify_against_eager(model, compiled, captured: Captured, draws, synthetic: frozenset[int], opts: CompileOptions,
                         report: Report, metric_score=None) -> None:
    """Check `compiled` on `draws` (synthetic: the indexes of random draws, held to the
    precision's tolerance); record the worst check per output; raise VerificationError on a miss."""
    budget = opts.accuracy_budget if report.lowered else None
    precision = precision_report.lowest_precision(report)

    def runs():
        for index, inputs in enumerate(draws):
            if index == 0:
                want = list(captured.example_outputs)
            else:
                args, kwargs = rebuild_call(captured.input_spec, list(inputs))
                with torch.no_grad():
                    want = [x for x in pytree.tree_leaves(plain_containers(model(*args, **kwargs))) if x is not None]
            yield list(compiled.run_flat(inputs)), want
    checks = worst_checks(captured.output_names, runs(), precision, budget, synthetic)
    report.verification = [c.to_dict() for c in checks]
    report.verified_draws = len(draws) - 1
    report.verified_calibration = len(opts.calibration or ())  # read once into a tuple by CompileOptions
    if budget is not None:
        precision_report.record_cost(checks, compiled, captured, opts, report, metric_score)
    if not all(c.ok for c in checks):
        fix = ("loosen accuracy_budget, pass calibration data like the real inputs, or use precision='fp32'" if budget is not None
               else "report the model; meanwhile try another backend=... or disable passes with disabled_passes=(...)")
        raise VerificationError(f"the compiled model disagrees with eager PyTorch: {failures_text(checks, precision, budget)}",
                                where=f"model {report.model}, backends {', '.join(compiled.backends.values())}", fix=fix)


def agrees_on_example(model, compiled, args: tuple, kwargs: dict, opts: CompileOptions, report: Report) -> str | None:
    """A compile-cache hit found by the model's fingerprint, checked on the example call alone
    (the build it came from was verified on every draw): the cached engine must answer like
    `model` within the precision's tolerance, or the budget for a lowered plan. Where every input
    and output leads with the same batch size, the model is called on the first row only and
    checked against the engine's first row (one row's eager cost, not the batch's); the whole
    call is checked where that sample cannot run or disagrees. Returns what was checked, or None
    when the engine disagrees."""
    budget = opts.accuracy_budget if report.lowered else None
    precision = precision_report.lowest_precision(report)
    try:
        got = list(compiled.run_flat(check_call(compiled.input_spec, args, kwargs)))
    except KilnError:  # the call does not fit the cached spec: not this model's build
        return None

    def agrees(got_, want) -> bool:
        if len(got_) != len(want):
            return False
        checks = worst_checks(compiled.plan.output_names, [(got_, want)], precision, budget, frozenset())
        if all(c.ok for c in checks):
            report.verification = [c.to_dict() for c in checks]
            report.verified_draws = report.verified_calibration = 0
            return True
        return False

    if (rows := _batch_rows(args, kwargs, got)) > 1:
        first = pytree.tree_map(lambda x: x[:1] if isinstance(x, torch.Tensor) else x, (args, kwargs))
        try:
            with torch.no_grad():
                want = [x for x in pytree.tree_leaves(plain_containers(model(*first[0], **first[1]))) if x is not None]
        except Exception:  # the model does not run on one row (a fixed batch in its code): check the whole call
            want = None
        if want is not None and agrees([g[:1] for g in got], want):
            return f"the first of the example's {rows} rows"
    with torch.no_grad():
        want = [x for x in pytree.tree_leaves(plain_containers(model(*args, **kwargs))) if x is not None]
    return "the example inputs" if agrees(got, want) else None


def _batch_rows(args: tuple, kwargs: dict, outputs: list[torch.Tensor]) -> int:
    """The batch size every input tensor and every output leads with, or 0 where they do not share one."""
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)] + list(outputs)
    sizes = {x.shape[0] if x.dim() else 0 for x in tensors}
    return sizes.pop() if tensors and len(sizes) == 1 else 0
