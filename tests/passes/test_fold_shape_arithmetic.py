import dataclasses
import operator

import torch
from torch import nn

from kiln.passes.context import PassContext
from kiln.passes.fold_shape_arithmetic import fold_shape_arithmetic
from kiln.types import InputSpec

aten = torch.ops.aten
SIZE_MATH = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, aten.sym_size.int,
             aten.sym_numel.default)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _size_math(run) -> list:
    return [op for op in run.ops() if op in SIZE_MATH]


def _unchanged(run, result) -> None:
    assert not result.changed and result.counts == {"folded": 0}
    assert [n.format_node() for n in run.gm.graph.nodes] == [n.format_node() for n in run.reference.graph.nodes]


def _reshape_to_one_row(x, y):
    # x and y share the dynamic batch, so the difference of their batch sizes is always 0
    rows = y.size(0) - x.size(0) + x.size(0) // x.size(0)
    return y.view(rows, -1, 4) * 2, x.reshape(x.size(0), -1)


def test_fold_shape_arithmetic_folds_what_every_batch_size_makes_constant(run_pass):
    run = run_pass(Fn(_reshape_to_one_row), (torch.randn(3, 4), torch.randn(3, 8)),
                   dynamic={"input_0": {0: "batch"}, "input_1": {0: "batch"}})
    result = run.apply(fold_shape_arithmetic)
    assert result.counts == {"folded": 3}  # sub -> 0, floordiv -> 1, add -> 1
    view = next(n for n in run.gm.graph.nodes if n.target is aten.view.default)
    assert view.args[1] == [1, -1, 4]
    assert _size_math(run) == [aten.sym_size.int]  # the batch itself stays symbolic
    run.assert_same_numerics()
    x, y = torch.randn(5, 4), torch.randn(5, 8)  # another batch size
    for got, want in zip(run.gm(x, y), _reshape_to_one_row(x, y)):
        torch.testing.assert_close(got, want)


def test_fold_shape_arithmetic_keeps_sizes_that_depend_on_a_dynamic_dim_with_a_reason(run_pass):
    run = run_pass(Fn(lambda x: x.reshape(x.size(0) * 4, -1)), (torch.randn(3, 4, 2),),
                   dynamic={"input_0": {0: "batch"}})
    result = run.apply(fold_shape_arithmetic)
    _unchanged(run, result)
    (skip,) = result.skipped
    assert "depends on a dynamic size (batch)" in skip.reason


def test_fold_shape_arithmetic_folds_sizes_the_input_spec_fixes(run_pass):
    # the graph was captured with a dynamic batch; a spec that fixes the batch at 3 makes
    # every size computation on it a number
    run = run_pass(Fn(lambda x: x.reshape(x.size(0) * 4, -1)), (torch.randn(3, 4, 2),),
                   dynamic={"input_0": {0: "batch"}})
    fixed = dataclasses.replace(run.ctx.input_spec.tensors[0], shape=(3, 4, 2))
    run.ctx = PassContext(run.ctx.profile, run.ctx.options, InputSpec((fixed,), run.ctx.input_spec.call_structure))
    result = run.apply(fold_shape_arithmetic)
    assert result.counts == {"folded": 2}  # sym_size -> 3, mul -> 12
    assert _size_math(run) == []
    reshape = next(n for n in run.gm.graph.nodes if n.target is aten.reshape.default)
    assert reshape.args[1] == [12, -1]
    run.assert_same_numerics()


def test_fold_shape_arithmetic_leaves_static_graphs_alone(run_pass):
    run = run_pass(Fn(lambda x: x.reshape(x.size(0) * 4, -1)), (torch.randn(3, 4, 2),))
    result = run.apply(fold_shape_arithmetic)
    _unchanged(run, result)  # export already wrote static sizes as ints
    assert result.skipped == ()
