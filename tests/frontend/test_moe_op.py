"""kiln::moe_experts: a mixture-of-experts block's experts as one operator, run in PyTorch."""

from __future__ import annotations

import torch

from kiln.frontend.moe_op import ACTIVATIONS, activation_name, moe_experts


def routed(tokens: int = 24, hidden: int = 16, experts: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator)
    weights, index = torch.randn(tokens, experts, generator=generator).softmax(-1).topk(2, dim=-1)
    up = torch.randn(experts, 2 * 32, hidden, generator=generator) * 0.2
    down = torch.randn(experts, hidden, 32, generator=generator) * 0.2
    return x, index, weights, up, down


def loop(x, index, weights, up, down):
    """transformers' reference: a loop over the experts, each on the tokens routed to it."""
    out = torch.zeros_like(x)
    for expert in range(up.shape[0]):
        token, slot = torch.where(index == expert)
        gate, lin = (x[token] @ up[expert].T).chunk(2, dim=-1)
        out.index_add_(0, token, (torch.nn.functional.silu(gate) * lin) @ down[expert].T * weights[token, slot, None])
    return out


def test_computes_the_loops_sums():
    x, index, weights, up, down = routed()
    got = moe_experts(x, index, weights, up, down, None, None, True, False, "silu")
    torch.testing.assert_close(got, loop(x, index, weights, up, down), rtol=1e-5, atol=1e-6)


def test_transposed_weights_and_biases_give_the_same_sums():
    x, index, weights, up, down = routed(seed=1)
    up_bias, down_bias = torch.zeros(4, 64), torch.zeros(4, 16)
    got = moe_experts(x, index, weights, up.transpose(1, 2), down.transpose(1, 2), up_bias, down_bias, True, True, "silu")
    torch.testing.assert_close(got, loop(x, index, weights, up, down), rtol=1e-5, atol=1e-6)


def test_computes_in_its_weights_type_and_answers_in_the_inputs():
    x, index, weights, up, down = routed(seed=2)
    got = moe_experts(x, index, weights, up.bfloat16(), down.bfloat16(), None, None, True, False, "silu")
    want = loop(x, index, weights, up, down)
    assert got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert 0.999 < cosine < 1.0  # bf16 arithmetic: close, not equal
    assert not torch.equal(got, want)


def test_no_tokens_and_idle_experts_give_zeros_where_nothing_was_routed():
    x, index, weights, up, down = routed(tokens=0)
    assert moe_experts(x, index, weights, up, down, None, None, True, False, "silu").shape == (0, 16)
    x, index, weights, up, down = routed(seed=3)
    index[:] = 1  # one expert takes every pair; the others have no tokens
    got = moe_experts(x, index, weights, up, down, None, None, True, False, "silu")
    torch.testing.assert_close(got, loop(x, index, weights, up, down), rtol=1e-5, atol=1e-6)


def test_exports_as_one_node_whose_shape_does_not_follow_the_routing():
    class Experts(torch.nn.Module):
        def __init__(self, up, down):
            super().__init__()
            self.up, self.down = torch.nn.Parameter(up), torch.nn.Parameter(down)

        def forward(self, x, index, weights):
            return torch.ops.kiln.moe_experts(x, index, weights, self.up, self.down, None, None, True, False, "silu")

    x, index, weights, up, down = routed()
    program = torch.export.export(Experts(up, down), (x, index, weights))
    calls = [n for n in program.graph.nodes if n.op == "call_function"]
    assert [str(n.target) for n in calls] == ["kiln.moe_experts.default"]


def test_activations_are_named_by_their_values_not_their_class():
    assert activation_name(torch.nn.SiLU()) == "silu"
    assert activation_name(torch.nn.GELU()) == "gelu"
    assert activation_name(torch.nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_name(lambda x: x * torch.sigmoid(x)) == "silu"
    assert activation_name(torch.nn.Tanh()) is None
    assert activation_name(lambda x: "not a tensor") is None
    assert set(ACTIVATIONS) == {"silu", "gelu", "gelu_tanh", "relu", "quick_gelu"}


def test_its_flops_are_every_pair_through_one_experts_two_projections():
    from torch.utils.flop_counter import FlopCounterMode

    x, index, weights, up, down = routed(tokens=24)
    with FlopCounterMode(display=False) as counter:
        moe_experts(x, index, weights, up, down, None, None, True, False, "silu")
    assert counter.get_total_flops() == 2 * (24 * 2) * (64 * 16 + 16 * 32)
