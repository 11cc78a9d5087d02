import pytest
import torch
from torch import nn

from kiln.passes import pipeline
from kiln.passes.group_epilogues import group_epilogues
from kiln.verify import TOLERANCE
from kiln.types import Precision

FP32 = TOLERANCE[Precision.FP32]  # compiled fp32 engines against eager

aten = torch.ops.aten


def _trained_stats(model: nn.Module, *shape) -> nn.Module:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape) * 3 + 1)
    return model.eval()


class Mlp(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), act, nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("act, name", [(nn.GELU(), "linear_gelu"), (nn.GELU("tanh"), "linear_gelu_tanh"),
                                       (nn.SiLU(), "linear_silu"), (nn.Hardswish(), "linear_hardswish")])
def test_group_epilogues_counts_linear_activation_pairs_without_changing_them(run_pass, act, name):
    run = run_pass(Mlp(act), (torch.randn(2, 5, 8),))
    before = run.ops()
    result = run.apply(group_epilogues)
    assert result.counts == {name: 1, "flattened_for_gemm_epilogue": 0} and not result.changed
    assert run.ops() == before


def test_group_epilogues_flattens_a_rank3_linear_before_relu_so_the_gemm_takes_the_activation(run_pass):
    run = run_pass(Mlp(nn.ReLU()), (torch.randn(2, 5, 8),))
    result = run.apply(group_epilogues)
    assert result.counts == {"linear_relu": 1, "flattened_for_gemm_epilogue": 1}
    linear = next(n for n in run.gm.graph.nodes if n.target is aten.linear.default)
    relu = next(iter(linear.users))
    assert relu.target is aten.relu.default and linear.args[0].meta["val"].dim() == 2
    assert next(iter(relu.users)).target is aten.view.default
    run.assert_same_numerics()


def test_group_epilogues_flattens_with_a_dynamic_batch(run_pass):
    run = run_pass(Mlp(nn.ReLU()), (torch.randn(3, 5, 8),), dynamic={"x": {0: "batch"}})
    assert run.apply(group_epilogues).counts["flattened_for_gemm_epilogue"] == 1
    assert aten.sym_size.int in run.ops()
    with torch.no_grad():
        for batch in (1, 4):
            x = torch.randn(batch, 5, 8)
            torch.testing.assert_close(run.gm(x)[0], run.reference(x)[0], rtol=FP32.rtol, atol=FP32.atol)


class ConvBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))  # 1x1 conv + relu
        return nn.functional.hardswish(self.bn(self.c3(x)))  # conv + BatchNorm + activation


def test_group_epilogues_counts_conv_pairs_after_batchnorm_is_folded(run_pass):
    run = run_pass(_trained_stats(ConvBlocks(), 2, 3, 6, 6), (torch.randn(1, 3, 6, 6),))
    records = pipeline.run(run.gm, run.ctx).records
    grouped = next(r for r in records if r.name == "group_epilogues")
    assert grouped.counts == {"conv_relu": 2, "conv_hardswish": 1, "flattened_for_gemm_epilogue": 0}
    run.assert_same_numerics()


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return torch.relu(y) + y


def test_group_epilogues_does_not_count_a_pair_whose_gemm_output_is_also_used(run_pass):
    run = run_pass(SharedOutput(), (torch.randn(2, 3, 8),))
    result = run.apply(group_epilogues)
    assert result.counts == {"flattened_for_gemm_epilogue": 0} and not result.changed
