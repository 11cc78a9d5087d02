import torch
from torch import nn

from kiln.passes.fold_constants import fold_constants
from kiln.passes.remove_dead_code import remove_dead_code
from kiln.passes.remove_inactive_dropout import remove_inactive_dropout

aten = torch.ops.aten


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x))


def test_remove_inactive_dropout_removes_eval_mode_dropout(run_pass):
    run = run_pass(WithDropout(), (torch.randn(3, 4),))
    result = run.apply(remove_inactive_dropout)
    assert result.counts == {"removed": 1}
    assert aten.dropout.default not in run.ops()
    run.assert_same_numerics()


def test_remove_inactive_dropout_keeps_active_dropout_with_a_reason(run_pass):
    class Active(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.5, training=True)

    run = run_pass(Active(), (torch.randn(3, 4),))
    result = run.apply(remove_inactive_dropout)
    assert not result.changed
    assert aten.dropout.default in run.ops()
    assert "active" in result.skipped[0].reason


class WeightOnlyMath(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        scaled = self.w.t() * 0.5 + 1.0  # depends on the weight only
        return x @ scaled


def test_fold_constants_precomputes_weight_only_subgraph(run_pass):
    run = run_pass(WeightOnlyMath(), (torch.randn(2, 6),))
    before = len(run.ops())
    result = run.apply(fold_constants)
    assert result.counts == {"folded": 1}
    assert len(run.ops()) == 1 < before  # only the matmul with the folded constant is left
    run.assert_same_numerics()


def test_fold_constants_leaves_large_expansions_unfolded_with_a_reason(run_pass):
    class Expands(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("row", torch.randn(1, 2048))

        def forward(self, x):
            return x + self.row.expand(2048, 2048).contiguous()

    run = run_pass(Expands(), (torch.randn(2048, 2048),))
    result = run.apply(fold_constants)
    assert result.counts == {"folded": 0}
    assert "bytes" in result.skipped[0].reason
    run.assert_same_numerics()


def test_fold_constants_never_folds_random_ops(run_pass):
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand(3)

    run = run_pass(Noisy(), (torch.randn(3),))
    run.apply(fold_constants)
    assert any("rand" in str(op) for op in run.ops())


def test_remove_dead_code_drops_unused_nodes_and_weights(run_pass):
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    run = run_pass(Unused(), (torch.randn(1, 3),))
    result = run.apply(remove_dead_code)
    assert result.counts["constants_dropped"] == 2
    assert not hasattr(run.gm.model, "unused") or not list(run.gm.model.unused.parameters())
    run.assert_same_numerics()


def test_fold_constants_keeps_a_constant_that_is_written_in_place_with_a_reason(run_pass):
    """Found on T5's relative position buckets (`buckets += ...`): stored as a constant, the
    in-place add would write into it and every call would see the previous call's sum."""
    class Buckets(nn.Module):
        def forward(self, x):
            positions = torch.arange(x.shape[1])
            positions.add_(1)
            return x * positions

    run = run_pass(Buckets(), (torch.randn(2, 5),))
    result = run.apply(fold_constants)
    assert any("written in place" in s.reason for s in result.skipped)
    first, second = run.gm(*run.inputs), run.gm(*run.inputs)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    run.assert_same_numerics()
