import torch
from torch import nn

from kiln.passes.remove_redundant_permutes import remove_redundant_permutes

aten = torch.ops.aten
PERMUTE_OPS = (aten.permute.default, aten.transpose.int, aten.t.default)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _permutes(run) -> list:
    return [op for op in run.ops() if op in PERMUTE_OPS]


def test_remove_redundant_permutes_drops_a_transpose_pair_that_cancels(run_pass):
    run = run_pass(Fn(lambda x: torch.relu(x.transpose(1, 2).transpose(1, 2))), (torch.randn(2, 3, 4),))
    result = run.apply(remove_redundant_permutes)
    assert result.counts == {"removed": 1, "composed": 0}
    assert run.ops() == [aten.relu.default]
    run.assert_same_numerics()


def test_remove_redundant_permutes_drops_nchw_nhwc_round_trip(run_pass):
    run = run_pass(Fn(lambda x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2) * 2), (torch.randn(2, 3, 4, 5),))
    assert run.apply(remove_redundant_permutes).counts["removed"] == 1
    assert _permutes(run) == []
    run.assert_same_numerics()


def test_remove_redundant_permutes_composes_a_chain_into_one_permute(run_pass):
    # transpose, permute with a negative axis, then t-like swap: three views, one net permutation
    run = run_pass(Fn(lambda x: x.transpose(0, 2).permute(1, 0, -1).transpose(1, 2).contiguous()),
                   (torch.randn(2, 3, 4),))
    result = run.apply(remove_redundant_permutes)
    assert result.counts == {"removed": 0, "composed": 2}
    assert _permutes(run) == [aten.permute.default]
    run.assert_same_numerics()
    permute = next(n for n in run.gm.graph.nodes if n.target is aten.permute.default)
    assert tuple(permute.meta["val"].shape) == (3, 2, 4)


def test_remove_redundant_permutes_keeps_a_chain_whose_middle_has_other_users(run_pass):
    def fn(x):
        mid = x.permute(2, 0, 1)
        return mid.permute(0, 2, 1), mid * 2

    run = run_pass(Fn(fn), (torch.randn(2, 3, 4),))
    before = run.ops()
    result = run.apply(remove_redundant_permutes)
    assert not result.changed and run.ops() == before
    (skip,) = result.skipped
    assert "also used by" in skip.reason and "mul" in skip.reason
    run.assert_same_numerics()


def test_remove_redundant_permutes_cancels_a_pair_even_when_the_middle_is_shared(run_pass):
    def fn(x):
        mid = x.transpose(0, 1)
        return mid.transpose(0, 1) + 1, mid * 2

    run = run_pass(Fn(fn), (torch.randn(3, 4),))
    assert run.apply(remove_redundant_permutes).counts == {"removed": 1, "composed": 0}
    assert _permutes(run) == [aten.transpose.int]  # the shared transpose stays for mul
    run.assert_same_numerics()


def test_remove_redundant_permutes_handles_t_of_a_matrix(run_pass):
    run = run_pass(Fn(lambda x: x.t().t() @ x.t()), (torch.randn(3, 4),))
    assert run.apply(remove_redundant_permutes).counts["removed"] == 1
    run.assert_same_numerics()


def test_remove_redundant_permutes_works_under_a_dynamic_batch(run_pass):
    run = run_pass(Fn(lambda x: x.transpose(1, 2).transpose(2, 1).sum(-1)), (torch.randn(2, 3, 4),),
                   dynamic={"input_0": {0: "batch"}})
    assert run.apply(remove_redundant_permutes).counts["removed"] == 1
    assert _permutes(run) == []
    x = torch.randn(5, 3, 4)  # another batch size than the example's
    torch.testing.assert_close(run.gm(x)[0], x.sum(-1))
