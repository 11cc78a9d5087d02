import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.passes.merge_qkv_projections import merge_qkv_projections

aten = torch.ops.aten


class Projections(nn.Module):
    def __init__(self, outs=(8, 8, 4), bias=(True, True, True)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, n, bias=b) for n, b in zip(outs, bias))

    def forward(self, x):
        outs = [layer(x) for layer in self.layers]
        return torch.relu(outs[0]), *(out * 2 for out in outs[1:])


def test_merge_qkv_projections_makes_one_linear_and_a_split(run_pass):
    run = run_pass(Projections(), (torch.randn(2, 5, 6),))
    result = run.apply(merge_qkv_projections)
    assert result.counts == {"merged": 1} and result.skipped == ()
    assert run.ops().count(aten.linear.default) == 1
    split = next(n for n in run.gm.graph.nodes if n.target is aten.split_with_sizes.default)
    assert split.args[1] == [8, 8, 4]
    linear = split.args[0]
    assert linear.meta["val"].shape == (2, 5, 20)
    assert all("val" in n.meta for n in run.gm.graph.nodes if n.op == "call_function")
    run.assert_same_numerics()


def test_merge_qkv_projections_merges_projections_without_bias(run_pass):
    run = run_pass(Projections(bias=(False, False, False)), (torch.randn(3, 6),))
    assert run.apply(merge_qkv_projections).counts == {"merged": 1}
    (linear,) = [n for n in run.gm.graph.nodes if n.target is aten.linear.default]
    assert linear.args[2] is None
    run.assert_same_numerics()


def test_merge_qkv_projections_merges_each_layer_of_bert(run_pass):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    run = run_pass(transformers.BertModel(config).eval(), (ids, torch.ones(2, 8, dtype=torch.int64)))
    before = run.ops().count(aten.linear.default)
    assert run.apply(merge_qkv_projections).counts == {"merged": 3}
    assert run.ops().count(aten.linear.default) == before - 3 * 2
    run.assert_same_numerics()


def test_merge_qkv_projections_leaves_a_pair_alone(run_pass):
    run = run_pass(Projections(outs=(4, 4)), (torch.randn(2, 6),))
    result = run.apply(merge_qkv_projections)
    assert not result.changed and result.skipped == ()


class ComputedWeight(Projections):
    def forward(self, x):
        q = F.linear(x, self.layers[0].weight * 2, self.layers[0].bias)
        return q, self.layers[1](x), self.layers[2](x)


class SharedWeight(Projections):
    def forward(self, x):
        a, b = self.layers[0], self.layers[1]
        return a(x), b(x), F.linear(x, a.weight), self.layers[2](x)


class FlattensFeatures(Projections):
    def forward(self, x):
        q, k, v = (layer(x) for layer in self.layers)
        return q.view(x.shape[0], -1), k, v


def _half_weight(run):
    """One weight stored in another dtype: only a hand-edited graph has this, eager would refuse."""
    weight = [n for n in run.gm.graph.nodes if n.target is aten.linear.default][2].args[1]
    owner, _, name = weight.target.rpartition(".")
    module = run.gm.get_submodule(owner)
    setattr(module, name, nn.Parameter(getattr(module, name).half(), requires_grad=False))


@pytest.mark.parametrize("model, edit, reason", [
    (ComputedWeight(), None, "weight is computed"),
    (SharedWeight(outs=(4, 4, 4)), None, "weight is shared"),
    (Projections(bias=(True, False, True)), None, "some of linear, linear_1, linear_2 have a bias and some do not"),
    (Projections(), _half_weight, "differ in dtype"),
])
def test_merge_qkv_projections_leaves_near_misses_unchanged_with_a_reason(run_pass, model, edit, reason):
    run = run_pass(model, (torch.randn(2, 6),))
    if edit is not None:
        edit(run)
    before = run.ops()
    result = run.apply(merge_qkv_projections)
    assert not result.changed and result.counts == {"merged": 0}
    assert run.ops() == before
    assert result.skipped and any(reason in skip.reason for skip in result.skipped), result.skipped


def test_merge_qkv_projections_skips_when_a_view_needs_a_contiguous_output(run_pass):
    run = run_pass(FlattensFeatures(), (torch.randn(2, 3, 6),))
    before = run.ops()
    result = run.apply(merge_qkv_projections)
    assert not result.changed and run.ops() == before
    assert any("slice of the merged output" in skip.reason for skip in result.skipped), result.skipped


@pytest.mark.parametrize("backend, runs", [("inductor", True), ("onnxruntime", False), (None, False)])
def test_pipeline_merges_projections_only_where_onnxruntime_cannot_build(run_pass, backend, runs):
    from kiln.options import CompileOptions
    from kiln.passes import pipeline
    from kiln.passes.context import PassContext

    run = run_pass(Projections(), (torch.randn(2, 6),))
    ctx = PassContext(run.ctx.profile, CompileOptions(backend=backend), run.ctx.input_spec)
    records = pipeline.run(run.gm, ctx).records
    merged = [r.counts for r in records if r.name == "merge_qkv_projections"]
    assert merged == ([{"merged": 1}] if runs else [])
    assert run.ops().count(aten.linear.default) == (1 if runs else 3)
    run.assert_same_numerics()
