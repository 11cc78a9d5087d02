import torch
from torch import nn

from kiln.passes.remove_noop_views import remove_noop_views

aten = torch.ops.aten


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _unchanged(run, result) -> None:
    assert not result.changed
    assert [n.format_node() for n in run.gm.graph.nodes] == [n.format_node() for n in run.reference.graph.nodes]


def test_remove_noop_views_removes_views_casts_and_aliases_to_the_same_shape(run_pass):
    def fn(x):
        y = x.reshape(2, 3, 4).view(2, 3, 4).expand(2, 3, 4)  # each to x's own shape
        y = y.to(torch.float32).detach()[:, :, :]  # same dtype; detach; a full slice
        return torch.relu(torch.ops.aten.alias(y))

    run = run_pass(Fn(fn), (torch.randn(2, 3, 4),))
    result = run.apply(remove_noop_views)
    assert result.counts == {"removed": 7, "collapsed": 0, "asserts_dropped": 1}  # export asserts a cast's input
    assert run.ops() == [aten.relu.default]
    run.assert_same_numerics()


def test_remove_noop_views_keeps_views_casts_and_slices_that_change_something(run_pass):
    def fn(x):
        return x.reshape(6, 4), x.to(torch.float64), x[:, 1:], x[:, ::2], x.expand(5, 2, 3, 4), x.transpose(1, 2).contiguous()

    run = run_pass(Fn(fn), (torch.randn(2, 3, 4),))
    before = [op for op in run.ops() if op is not aten._assert_tensor_metadata.default]
    result = run.apply(remove_noop_views)
    assert result.counts == {"removed": 0, "collapsed": 0, "asserts_dropped": 1}  # the cast's input check
    assert run.ops() == before
    assert result.skipped == ()  # not near-misses: they do real work
    run.assert_same_numerics()


def test_remove_noop_views_removes_contiguous_and_copies_on_contiguous_memory(run_pass):
    def fn(x):
        a = torch.ops.aten.contiguous.default(x * 2)  # export drops .contiguous() on contiguous input itself
        return a.to(torch.float32, copy=True).sum(0), (x - 1).clone(memory_format=torch.contiguous_format)

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    assert run.apply(remove_noop_views).counts == {"removed": 3, "collapsed": 0, "asserts_dropped": 1}
    assert run.ops() == [aten.mul.Tensor, aten.sum.dim_IntList, aten.sub.Tensor]
    run.assert_same_numerics()


def test_remove_noop_views_removes_clone_of_an_intermediate_value(run_pass):
    run = run_pass(Fn(lambda x: (x + 1).clone() * 2), (torch.randn(3, 4),))
    assert run.apply(remove_noop_views).counts["removed"] == 1
    assert run.ops() == [aten.add.Tensor, aten.mul.Tensor]
    run.assert_same_numerics()


def test_remove_noop_views_collapses_reshape_of_reshape(run_pass):
    run = run_pass(Fn(lambda x: (x + 1).reshape(6, 4).view(4, 6).reshape(3, 8)), (torch.randn(2, 3, 4),))
    result = run.apply(remove_noop_views)
    assert result.counts == {"removed": 0, "collapsed": 2, "asserts_dropped": 0}
    assert run.ops() == [aten.add.Tensor, aten.reshape.default]
    run.assert_same_numerics()


def test_remove_noop_views_removes_a_reshape_chain_that_returns_to_the_start(run_pass):
    run = run_pass(Fn(lambda x: (x + 1).reshape(6, 4).reshape(2, 3, 4) * 3), (torch.randn(2, 3, 4),))
    assert run.apply(remove_noop_views).counts == {"removed": 1, "collapsed": 1, "asserts_dropped": 0}
    assert run.ops() == [aten.add.Tensor, aten.mul.Tensor]
    run.assert_same_numerics()


def test_remove_noop_views_keeps_a_reshape_chain_from_non_contiguous_memory(run_pass):
    run = run_pass(Fn(lambda x: x.transpose(0, 1).reshape(12).view(3, 4)), (torch.randn(3, 4),))
    result = run.apply(remove_noop_views)
    _unchanged(run, result)
    assert "transpose is not contiguous" in result.skipped[0].reason


def test_remove_noop_views_keeps_a_reshape_chain_whose_middle_has_other_users(run_pass):
    def fn(x):
        mid = (x + 1).reshape(12)
        return mid.reshape(3, 4), mid * 2

    run = run_pass(Fn(fn), (torch.randn(2, 6),))
    result = run.apply(remove_noop_views)
    _unchanged(run, result)
    assert "also used by" in result.skipped[0].reason


def test_remove_noop_views_keeps_a_clone_whose_result_is_written_in_place(run_pass):
    def fn(x):
        y = x + 1
        c = y.clone()
        c.mul_(2)  # without the clone this would change y, which is returned too
        return c, y

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    result = run.apply(remove_noop_views)
    _unchanged(run, result)
    assert "written in place by mul_" in result.skipped[0].reason
    run.assert_same_numerics()


def test_remove_noop_views_keeps_a_clone_whose_source_is_written_later(run_pass):
    def fn(x):
        y = x + 1
        c = y.clone()  # keeps y's value from before the in-place add below
        y.add_(5)
        return c * y

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    result = run.apply(remove_noop_views)
    _unchanged(run, result)
    assert "add_" in result.skipped[0].reason and "value before" in result.skipped[0].reason


def test_remove_noop_views_keeps_a_clone_returned_as_output_of_an_input(run_pass):
    run = run_pass(Fn(lambda x: (x.clone(), x * 2)), (torch.randn(3, 4),))
    result = run.apply(remove_noop_views)
    _unchanged(run, result)
    assert "graph output and would alias placeholder" in result.skipped[0].reason


def test_remove_noop_views_keeps_a_clone_returned_beside_the_value_it_copies(run_pass):
    def fn(x):
        y = x * 2
        return y, y.clone()

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    result = run.apply(remove_noop_views)
    _unchanged(run, result)
    assert "would alias another output" in result.skipped[0].reason


def test_remove_noop_views_removes_a_reshape_to_the_same_dynamic_shape(run_pass):
    def fn(x):
        return torch.relu(x.view(x.shape[0], -1, 4)), x.reshape(x.shape[0], 12)

    run = run_pass(Fn(fn), (torch.randn(2, 3, 4),), dynamic={"input_0": {0: "batch"}})
    result = run.apply(remove_noop_views)
    assert result.counts["removed"] == 1  # view to (batch, 3, 4); the reshape to (batch, 12) stays
    assert aten.view.default not in run.ops() and aten.reshape.default in run.ops()
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(run.gm(x)[0], torch.relu(x))
    run.assert_same_numerics()
