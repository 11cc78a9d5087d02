import pytest
import torch
from torch import nn

from kiln.passes.recognise_norms import recognise_norms

aten = torch.ops.aten


class HandLayerNorm(nn.Module):
    """LayerNorm written out, in the spelling `form` picks."""

    def __init__(self, form: str, affine: bool = True):
        super().__init__()
        self.form, self.affine = form, affine
        self.w = nn.Parameter(torch.randn(8))
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        if self.form == "mean_of_squares_div_sqrt":
            y = (x - u) / torch.sqrt((x - u).pow(2).mean(-1, keepdim=True) + 1e-5)
        elif self.form == "var_rsqrt":
            y = (x - u) * torch.rsqrt(torch.var(x, -1, keepdim=True, correction=0) + 1e-5)
        elif self.form == "var_mean_reciprocal":
            var, _ = torch.var_mean(x, -1, keepdim=True, unbiased=False)
            y = (x - u) * (1 / torch.sqrt(var + 1e-6))
        else:  # centred computed once, squared by multiplication
            c = x - u
            y = c / torch.sqrt((c * c).mean(-1, keepdim=True) + 1e-5)
        return self.w * y + self.b if self.affine else y


@pytest.mark.parametrize("form", ["mean_of_squares_div_sqrt", "var_rsqrt", "var_mean_reciprocal", "centred_once"])
@pytest.mark.parametrize("affine", [True, False])
def test_recognise_norms_turns_hand_written_layer_norm_into_one_op(run_pass, form, affine):
    run = run_pass(HandLayerNorm(form, affine), (torch.randn(2, 5, 8),))
    result = run.apply(recognise_norms)
    assert result.counts == {"layer_norm": 1, "rms_norm": 0} and result.skipped == ()
    assert run.ops() == [aten.layer_norm.default]
    (norm,) = [n for n in run.gm.graph.nodes if n.op == "call_function"]
    weight, bias = norm.args[2], norm.args[3]
    assert (weight is not None and bias is not None) == affine
    assert norm.args[1] == [8]
    run.assert_same_numerics()


class LayerNormOverTwoDims(nn.Module):
    def forward(self, x):
        u = x.mean((-2, -1), keepdim=True)
        return (x - u) * torch.rsqrt(((x - u) ** 2).mean((-1, -2), keepdim=True) + 1e-5)


def test_recognise_norms_takes_several_trailing_dims(run_pass):
    run = run_pass(LayerNormOverTwoDims(), (torch.randn(2, 3, 4, 6),))
    assert run.apply(recognise_norms).counts["layer_norm"] == 1
    (norm,) = [n for n in run.gm.graph.nodes if n.op == "call_function"]
    assert norm.args[1] == [4, 6]
    run.assert_same_numerics()


class HandRMSNorm(nn.Module):
    """RMSNorm in LLaMA's form (cast to float32 and back), T5's form, or plain."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.randn(8))

    def forward(self, x):
        if self.form == "llama":
            dtype = x.dtype
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.weight * h.to(dtype)
        if self.form == "t5":
            variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(variance + 1e-6))
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)


@pytest.mark.parametrize("form", ["llama", "t5", "plain"])
def test_recognise_norms_turns_hand_written_rms_norm_into_one_op(run_pass, form):
    run = run_pass(HandRMSNorm(form), (torch.randn(2, 5, 8),))
    result = run.apply(recognise_norms)
    assert result.counts == {"layer_norm": 0, "rms_norm": 1}
    ops = [op for op in run.ops() if op is not aten._assert_tensor_metadata.default]
    assert ops == [aten.rms_norm.default]
    norm = next(n for n in run.gm.graph.nodes if n.target is aten.rms_norm.default)
    assert (norm.args[2] is not None) == (form != "plain")  # the weight is folded in
    run.assert_same_numerics()


def test_recognise_norms_keeps_llama_casts_around_a_bfloat16_rms_norm(run_pass):
    model = HandRMSNorm("llama").to(torch.bfloat16)
    run = run_pass(model, (torch.randn(2, 5, 8, dtype=torch.bfloat16),))
    assert run.apply(recognise_norms).counts["rms_norm"] == 1
    norm = next(n for n in run.gm.graph.nodes if n.target is aten.rms_norm.default)
    # normalised in float32, then cast down, then scaled in bfloat16 like the original
    assert norm.args[2] is None and norm.meta["val"].dtype == torch.float32
    assert aten.mul.Tensor in run.ops()
    with torch.no_grad():
        x = run.inputs[0]
        torch.testing.assert_close(run.gm(x)[0], run.reference(x)[0], rtol=0, atol=0)


class NearMiss(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x):
        if self.form == "non_trailing":
            u = x.mean(1, keepdim=True)
            return (x - u) / torch.sqrt(((x - u) ** 2).mean(1, keepdim=True) + 1e-5)
        u = x.mean(-1, keepdim=True)
        if self.form == "unbiased":
            return (x - u) * torch.rsqrt(torch.var(x, -1, keepdim=True) + 1e-5)
        if self.form == "eps_outside_sqrt":
            return (x - u) / (torch.sqrt(((x - u) ** 2).mean(-1, keepdim=True)) + 1e-5)
        if self.form == "rms_eps_outside_sqrt":
            return x / (torch.sqrt((x * x).mean(-1, keepdim=True)) + 1e-5)
        if self.form == "different_dims":
            return (x - u) / torch.sqrt(((x - u) ** 2).mean((-2, -1), keepdim=True) + 1e-5)
        return x * torch.rsqrt((x * x).mean(1, keepdim=True) + 1e-6)  # rms over a middle dim


@pytest.mark.parametrize("form, reason", [
    ("non_trailing", "trailing dims only"),
    ("unbiased", "unbiased (correction=1)"),
    ("eps_outside_sqrt", "after the square root"),
    ("rms_eps_outside_sqrt", "after the square root"),
    ("different_dims", "variance over dims"),
    ("rms_non_trailing", "trailing dims only"),
])
def test_recognise_norms_leaves_near_misses_unchanged_with_the_reason(run_pass, form, reason):
    run = run_pass(NearMiss(form), (torch.randn(2, 5, 8),))
    before = run.ops()
    result = run.apply(recognise_norms)
    assert not result.changed and result.counts == {"layer_norm": 0, "rms_norm": 0}
    assert run.ops() == before
    (skip,) = result.skipped
    assert reason in skip.reason


class AttentionScale(nn.Module):
    def forward(self, q, k):
        return (q * torch.rsqrt(torch.tensor(16.0))) @ k.transpose(-1, -2)


def test_recognise_norms_ignores_products_with_an_rsqrt_that_is_no_norm(run_pass):
    run = run_pass(AttentionScale(), (torch.randn(2, 4, 16), torch.randn(2, 4, 16)))
    result = run.apply(recognise_norms)
    assert not result.changed and result.skipped == ()


class NormOutputUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        y = (x - u) * torch.rsqrt(torch.var(x, -1, keepdim=True, correction=0) + 1e-5)
        return self.w * y, y


def test_recognise_norms_keeps_the_weight_separate_when_the_plain_norm_is_also_used(run_pass):
    run = run_pass(NormOutputUsedTwice(), (torch.randn(3, 8),))
    assert run.apply(recognise_norms).counts["layer_norm"] == 1
    norm = next(n for n in run.gm.graph.nodes if n.target is aten.layer_norm.default)
    assert norm.args[2] is None and aten.mul.Tensor in run.ops()
    run.assert_same_numerics()
