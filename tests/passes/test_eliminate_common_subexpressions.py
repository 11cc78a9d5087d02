import torch
from torch import nn

from kiln.passes.eliminate_common_subexpressions import eliminate_common_subexpressions

aten = torch.ops.aten


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _unchanged(run, result) -> None:
    assert not result.changed and result.counts == {"merged": 0}
    assert [n.format_node() for n in run.gm.graph.nodes] == [n.format_node() for n in run.reference.graph.nodes]


def test_cse_merges_identical_computations_transitively(run_pass):
    def fn(x):
        a = torch.sigmoid(x).transpose(0, 1) * 2
        b = torch.sigmoid(x).transpose(0, 1) * 2  # the same three ops again
        return a + b

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    result = run.apply(eliminate_common_subexpressions)
    assert result.counts == {"merged": 3}
    assert run.ops() == [aten.sigmoid.default, aten.transpose.int, aten.mul.Tensor, aten.add.Tensor]
    add = next(n for n in run.gm.graph.nodes if n.target is aten.add.Tensor)
    assert add.args[0] is add.args[1]
    run.assert_same_numerics()


def test_cse_merges_factories_such_as_arange(run_pass):
    run = run_pass(Fn(lambda x: x + torch.arange(4.0) + torch.arange(4.0)), (torch.randn(3, 4),))
    assert run.apply(eliminate_common_subexpressions).counts == {"merged": 1}
    assert run.ops().count(aten.arange.start) + run.ops().count(aten.arange.default) == 1
    run.assert_same_numerics()


def test_cse_never_merges_random_ops(run_pass):
    run = run_pass(Fn(lambda x: torch.rand_like(x) - torch.rand_like(x)), (torch.randn(3, 4),))
    result = run.apply(eliminate_common_subexpressions)
    _unchanged(run, result)
    assert "draws new random numbers" in result.skipped[0].reason


def test_cse_does_not_merge_across_an_in_place_write(run_pass):
    def fn(x):
        y = x + 1
        row = y[0]
        a = row.sin()
        y.add_(1)  # changes row too: it is a view of y
        return a, row.sin()  # the same node, the same op, another value

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    result = run.apply(eliminate_common_subexpressions)
    _unchanged(run, result)
    assert "in-place write between them" in result.skipped[0].reason
    run.assert_same_numerics()


def test_cse_does_not_merge_values_one_of_which_is_written_later(run_pass):
    def fn(x):
        first, second = x.clone(), x.clone()
        first.mul_(2)  # merging would double second as well
        return first, second

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    result = run.apply(eliminate_common_subexpressions)
    _unchanged(run, result)
    assert "mul_ writes one of them in place" in result.skipped[0].reason
    run.assert_same_numerics()


def test_cse_never_merges_reads_of_different_attributes_with_equal_values(run_pass):
    class TwoBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("a", torch.ones(4))
            self.register_buffer("b", torch.ones(4))

        def forward(self, x):
            return x + self.a, x + self.b

    run = run_pass(TwoBuffers(), (torch.randn(3, 4),))
    result = run.apply(eliminate_common_subexpressions)
    _unchanged(run, result)


def test_cse_tells_int_and_float_scalars_apart(run_pass):
    run = run_pass(Fn(lambda x: (x * 2, x * 2.0, x * 2)), (torch.arange(6).reshape(2, 3),))
    result = run.apply(eliminate_common_subexpressions)
    assert result.counts == {"merged": 1}  # the two `* 2`; `* 2.0` gives float, not int
    outs = run.gm(*run.inputs)
    assert outs[0].dtype == torch.int64 and outs[1].dtype == torch.float32
    run.assert_same_numerics()


def test_cse_merges_size_reads_under_a_dynamic_batch(run_pass):
    def fn(x):
        return x.reshape(x.shape[0], -1) * 2, x.reshape(x.shape[0], -1) + 1

    run = run_pass(Fn(fn), (torch.randn(2, 3, 4),), dynamic={"input_0": {0: "batch"}})
    assert run.apply(eliminate_common_subexpressions).counts["merged"] >= 1
    assert run.ops().count(aten.reshape.default) == 1
    x = torch.randn(5, 3, 4)
    a, b = run.gm(x)
    torch.testing.assert_close(a, x.reshape(5, -1) * 2)
    torch.testing.assert_close(b, x.reshape(5, -1) + 1)
