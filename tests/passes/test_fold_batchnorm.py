import torch
from torch import nn

from kiln.passes.fold_batchnorm import fold_batchnorm

aten = torch.ops.aten


def _trained_stats(model: nn.Module, *shape) -> nn.Module:
    """Run BatchNorm forward in training mode so its statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape) * 3 + 1)
    return model.eval()


class ConvBn(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=bias)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_fold_batchnorm_folds_conv_bn_into_one_conv(run_pass):
    run = run_pass(_trained_stats(ConvBn(), 4, 3, 12, 12), (torch.randn(2, 3, 12, 12),))
    result = run.apply(fold_batchnorm)
    assert result.counts == {"folded": 1}
    assert aten.batch_norm.default not in run.ops()
    assert run.ops().count(aten.conv2d.default) == 1
    run.assert_same_numerics()


def test_fold_batchnorm_adds_a_bias_to_a_conv_without_one(run_pass):
    run = run_pass(_trained_stats(ConvBn(bias=False), 4, 3, 12, 12), (torch.randn(2, 3, 12, 12),))
    assert run.apply(fold_batchnorm).counts == {"folded": 1}
    conv = next(n for n in run.gm.graph.nodes if n.target is aten.conv2d.default)
    assert conv.args[2] is not None
    run.assert_same_numerics()


def test_fold_batchnorm_folds_linear_then_batchnorm1d(run_pass):
    model = _trained_stats(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), 16, 6)
    run = run_pass(model, (torch.randn(4, 6),))
    assert run.apply(fold_batchnorm).counts == {"folded": 1}
    assert run.ops() == [aten.linear.default]
    run.assert_same_numerics()


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_fold_batchnorm_skips_conv_whose_output_is_also_used_elsewhere(run_pass):
    run = run_pass(_trained_stats(SharedOutput(), 2, 3, 5, 5), (torch.randn(1, 3, 5, 5),))
    before = run.ops()
    result = run.apply(fold_batchnorm)
    assert not result.changed and result.counts == {"folded": 0}
    assert run.ops() == before
    (skip,) = result.skipped
    assert "conv2d" in skip.reason and "also used" in skip.reason


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + nn.functional.conv2d(x, self.conv.weight)


def test_fold_batchnorm_skips_conv_whose_weight_is_shared(run_pass):
    run = run_pass(_trained_stats(SharedWeight(), 2, 4, 5, 5), (torch.randn(1, 4, 5, 5),))
    before = run.ops()
    result = run.apply(fold_batchnorm)
    assert result.counts == {"folded": 0}
    assert run.ops() == before
    assert "weight is shared" in result.skipped[0].reason
    run.assert_same_numerics()


def test_fold_batchnorm_leaves_batchnorm_on_an_input_alone(run_pass):
    model = _trained_stats(nn.BatchNorm2d(3), 2, 3, 4, 4)
    run = run_pass(model, (torch.randn(1, 3, 4, 4),))
    result = run.apply(fold_batchnorm)
    assert not result.changed and result.skipped == ()
    assert aten.batch_norm.default in run.ops()
