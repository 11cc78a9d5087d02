"""guard_fully_masked_attention: a query whose mask hides every key gets PyTorch's zeros on every
backend (OpenVINO gave NaN there, ONNX Runtime the mean of V)."""

import pytest
import torch
from torch import nn

import kiln
from kiln.passes.guard_fully_masked_attention import guard_fully_masked_attention
from kiln.types import Precision
from kiln.verify import TOLERANCE

aten = torch.ops.aten
FP32 = TOLERANCE[Precision.FP32]


class MaskedAttention(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.qkv, self.heads = nn.Linear(dim, 3 * dim), heads

    def forward(self, x, mask):  # mask: [batch, seq] of 0/1, like a tokenizer's attention_mask
        b, s, d = x.shape
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        keep = mask.bool()[:, None, None, :].expand(b, 1, s, s)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return out.transpose(1, 2).reshape(b, s, d)


def _inputs():
    torch.manual_seed(0)
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    mask[2] = 0  # a fully padded sequence
    return torch.randn(3, 6, 16), mask


def test_the_guard_follows_each_masked_attention_and_keeps_the_numerics_with_a_fully_masked_row(run_pass):
    run = run_pass(MaskedAttention().eval(), _inputs())
    result = run.apply(guard_fully_masked_attention)
    assert result.changed and result.counts == {"guarded": 1}
    sdpa = next(n for n in run.gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default)
    [user] = sdpa.users
    assert user.target is aten.where.ScalarOther and user.args[0].target is aten.any.dim
    run.assert_same_numerics()
    assert float(run.gm(*run.inputs)[0][2].abs().max()) == 0.0  # PyTorch's zeros for the padded sequence


def test_the_guard_is_added_once_however_often_the_pass_runs(run_pass):
    run = run_pass(MaskedAttention().eval(), _inputs())
    run.apply(guard_fully_masked_attention)
    again = run.apply(guard_fully_masked_attention)
    assert not again.changed and again.counts == {"guarded": 0}


def test_attention_without_a_mask_is_left_alone(run_pass):
    class Causal(nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    run = run_pass(Causal().eval(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3)))
    result = run.apply(guard_fully_masked_attention)
    assert not result.changed and not result.skipped


def test_a_stored_mask_that_leaves_every_query_a_key_is_skipped_with_a_reason(run_pass):
    class Stored(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.tril(torch.ones(4, 4, dtype=torch.bool)))

        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)

    run = run_pass(Stored().eval(), tuple(torch.randn(1, 2, 4, 8) for _ in range(3)))
    result = run.apply(guard_fully_masked_attention)
    assert not result.changed and "leaves every query a key" in result.skipped[0].reason


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "inductor"])
def test_every_backend_gives_eagers_answer_for_a_fully_padded_sequence(backend):
    pytest.importorskip(backend if backend != "inductor" else "torch")
    model, (x, mask) = MaskedAttention().eval(), _inputs()
    compiled = kiln.optimize(model, "cpu-x86", (x, torch.ones_like(mask)), backend=backend, precision="fp32", cache=False,
                             isolate=False, dynamic=None)
    with torch.no_grad():
        want = model(x, mask)
    got = compiled(x, mask)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=FP32.rtol, atol=FP32.atol)
