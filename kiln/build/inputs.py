"""The inputs a build is proven on: the user's calibration samples in the compiled input layout,
fresh random draws of the input spec, and the budget's metric wrapped for flat tensors."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from kiln.errors import InputMismatch, OptionsError
from kiln.frontend.capture import Captured
from kiln.frontend.input_spec import check_call, normalize_call, random_inputs
from kiln.ir import PartitionPlan
from kiln.options import CompileOptions
from kiln.types import Dim

INTEGER_CHECKS = ("integer layers were verified on the example inputs and the calibration samples, not on random draws: "
                  "their activation ranges are calibrated on real inputs, which random draws do not resemble")


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


def verification_draws(captured: Captured, opts: CompileOptions, calibration: tuple = ()) -> list[tuple[torch.Tensor, ...]]:
    """The example inputs, `verify_draws` fresh random draws of the same spec, then the
    calibration samples (the inputs a lowered model's accuracy is proven on). The first draw
    has the example's sizes; the second gives every dynamic dim another size in its range (an
    engine right only at the example's batch is caught there); later ones draw sizes at random."""
    draws = [captured.example_inputs]
    example_sizes = {d.name: captured.example_inputs[i].shape[axis]
                     for i, t in enumerate(captured.input_spec.tensors) for axis, d in enumerate(t.shape) if isinstance(d, Dim)}
    dims = captured.input_spec.dims()
    other_sizes = {name: _another_size(size, dims[name]) for name, size in example_sizes.items()}
    for k in range(opts.verify_draws if opts.verify else 0):
        sizes = example_sizes if k == 0 else other_sizes if k == 1 else None
        draws.append(tuple(random_inputs(captured.input_spec, opts.seed + k, sizes)))
    return draws + [tuple(c) for c in calibration]


def _another_size(size: int, dim: Dim) -> int:
    """A size of `dim` other than the example's, next to it (the range allowing)."""
    return size + 1 if size + 1 <= dim.max else size - 1 if size - 1 >= dim.min else size


def inputs_to_check(plan: PartitionPlan, draws: list, calibration: tuple) -> tuple[list, frozenset[int], str | None]:
    """The verification inputs for `plan`, the indexes among them of the random draws (which a
    lowered plan meets at its precision's tolerance, not its budget: verify.worst_checks), and
    the report's note when random draws were left out.

    An integer plan's activation ranges are calibrated on the user's samples: random draws of
    the input spec fall outside them (an image model's first layer sees noise, not pixels), so
    its accuracy is verified on the example inputs and the calibration samples."""
    checked, note = draws, None
    if _integer_plan(plan) and calibration and len(draws) > 1 + len(calibration):
        checked, note = [draws[0], *draws[len(draws) - len(calibration):]], INTEGER_CHECKS
    return checked, frozenset(range(1, len(checked) - len(calibration))), note


def _integer_plan(plan: PartitionPlan) -> bool:
    return any(layer.precision.is_integer for partition in plan.partitions for layer in partition.graph.precision.lowered)
