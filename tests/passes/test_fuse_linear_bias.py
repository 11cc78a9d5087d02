import torch
from torch import nn

from kiln.passes import pipeline
from kiln.passes.fuse_linear_bias import fuse_linear_bias
from kiln.passes.pipeline import PIPELINE

aten = torch.ops.aten


class MatmulBias(nn.Module):
    def __init__(self, bias_first: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.b = nn.Parameter(torch.randn(6))
        self.bias_first = bias_first

    def forward(self, x):
        return self.b + x @ self.w.t() if self.bias_first else torch.matmul(x, self.w.T) + self.b


def test_fuse_linear_bias_turns_matmul_with_transposed_weight_and_bias_into_linear(run_pass):
    for bias_first in (False, True):
        run = run_pass(MatmulBias(bias_first), (torch.randn(2, 3, 8),))
        result = run.apply(fuse_linear_bias)
        assert result.counts == {"linear": 1, "with_bias": 1}
        (linear,) = [n for n in run.gm.graph.nodes if n.op == "call_function"]
        assert linear.target is aten.linear.default and linear.args[1].target == "model.w"  # no copy made
        run.assert_same_numerics()


def test_fuse_linear_bias_transposes_a_weight_that_fold_constants_already_transposed(run_pass):
    run = run_pass(MatmulBias(), (torch.randn(2, 3, 8),))
    pipeline.run(run.gm, run.ctx, PIPELINE[:1])  # cleanup folds w.t() into a [8, 6] constant
    assert aten.matmul.default in run.ops()
    assert run.apply(fuse_linear_bias).counts == {"linear": 1, "with_bias": 1}
    assert run.ops() == [aten.linear.default]
    linear = next(n for n in run.gm.graph.nodes if n.target is aten.linear.default)
    assert linear.args[1].meta["val"].shape == (6, 8)
    run.assert_same_numerics()


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight stored [in, out], addmm over the flattened input."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 12))
        self.bias = nn.Parameter(torch.randn(12))

    def forward(self, x):
        size_out = x.size()[:-1] + (12,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


def test_fuse_linear_bias_turns_gpt2_conv1d_addmm_and_its_views_into_one_linear(run_pass):
    run = run_pass(Conv1D(), (torch.randn(2, 5, 8),))
    assert run.apply(fuse_linear_bias).counts == {"linear": 1, "with_bias": 1}
    assert run.ops() == [aten.linear.default]
    linear = next(n for n in run.gm.graph.nodes if n.target is aten.linear.default)
    assert linear.args[0].op == "placeholder" and linear.meta["val"].shape == (2, 5, 12)
    run.assert_same_numerics()


class NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return x @ self.w


def test_fuse_linear_bias_turns_a_bias_free_matmul_into_linear(run_pass):
    run = run_pass(NoBias(), (torch.randn(3, 8),))
    assert run.apply(fuse_linear_bias).counts == {"linear": 1, "with_bias": 0}
    assert run.ops() == [aten.linear.default]
    run.assert_same_numerics()


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.w, self.w.sum()


def test_fuse_linear_bias_skips_a_weight_used_elsewhere(run_pass):
    run = run_pass(SharedWeight(), (torch.randn(3, 8),))
    before = run.ops()
    result = run.apply(fuse_linear_bias)
    assert not result.changed and run.ops() == before
    (skip,) = result.skipped
    assert "also used by sum" in skip.reason


class Activations(nn.Module):
    def forward(self, q, k):
        return q @ k.transpose(-1, -2)


def test_fuse_linear_bias_leaves_products_of_two_activations_alone(run_pass):
    run = run_pass(Activations(), (torch.randn(2, 4, 8), torch.randn(2, 4, 8)))
    result = run.apply(fuse_linear_bias)
    assert not result.changed and result.skipped == ()


class BiasOfWrongShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.b = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.w + self.b


def test_fuse_linear_bias_keeps_an_add_that_is_not_a_per_feature_bias(run_pass):
    run = run_pass(BiasOfWrongShape(), (torch.randn(3, 8),))
    assert run.apply(fuse_linear_bias).counts == {"linear": 1, "with_bias": 0}
    assert run.ops() == [aten.linear.default, aten.add.Tensor]
    run.assert_same_numerics()


def test_fuse_linear_bias_regroups_rows_when_the_flattening_view_also_merged_heads(run_pass):
    """GPT-2's c_proj after cleanup: reshape(transpose(attn), [B*S, D]) -> addmm -> view(B, S, N).
    The input is reshaped straight to [B, S, D], so the GEMM keeps the model's rank (ONNX
    Runtime's attention fusion rewires a 2-d Gemm input to a 3-d tensor otherwise)."""
    class HeadsMerged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 6))
            self.bias = torch.nn.Parameter(torch.randn(6))

        def forward(self, attn):  # attn: [B, H, S, E] with H * E = 8
            b, h, s, e = attn.shape
            flat = attn.transpose(1, 2).reshape(b * s, h * e)
            return torch.addmm(self.bias, flat, self.weight).view(b, s, 6)

    run = run_pass(HeadsMerged(), (torch.randn(2, 2, 3, 4),))
    result = run.apply(fuse_linear_bias)
    assert result.counts["linear"] == 1 and torch.ops.aten.addmm.default not in run.ops()
    linear = next(n for n in run.gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    assert linear.meta["val"].dim() == 3
    run.assert_same_numerics()
