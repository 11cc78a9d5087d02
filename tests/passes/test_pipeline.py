import pytest
import torch
from torch import nn

from kiln.errors import OptionsError, PassFailed
from kiln.options import CompileOptions
from kiln.passes import pipeline
from kiln.passes.context import PassContext
from kiln.passes.pipeline import PIPELINE, Stage
from kiln.passes.result import PassResult


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.drop(torch.relu(self.bn(self.conv(x))))


def test_pipeline_order_is_one_literal_table_of_named_stages():
    assert [s.name for s in PIPELINE] == ["cleanup", "fusion", "fusion", "masking", "cleanup", "precision", "sparsity", "placement"]
    assert all(callable(p) for s in PIPELINE for p in s.passes)


def test_pipeline_recognises_patterns_before_folding_batchnorm_and_groups_epilogues_after():
    fusion = next(s for s in PIPELINE if s.name == "fusion")
    names = [p.__name__ for p in fusion.passes]
    assert names.index("fuse_linear_bias") < names.index("fold_batchnorm") < names.index("group_epilogues")
    assert {"recognise_norms", "recognise_activations"} <= set(names[:names.index("fold_batchnorm")])


def test_pipeline_records_every_pass_with_counts_and_keeps_numerics(run_pass):
    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    records = pipeline.run(run.gm, run.ctx).records
    names = [r.name for r in records]
    assert "fold_batchnorm" in names and "remove_inactive_dropout" in names
    folded = next(r for r in records if r.name == "fold_batchnorm")
    assert folded.counts == {"folded": 1} and folded.seconds >= 0
    run.assert_same_numerics()


def test_pipeline_skips_disabled_passes(run_pass):
    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    ctx = PassContext(run.ctx.profile, CompileOptions(disabled_passes=("fold_batchnorm",)), run.ctx.input_spec)
    records = pipeline.run(run.gm, ctx).records
    assert "fold_batchnorm" not in {r.name for r in records}
    assert torch.ops.aten.batch_norm.default in run.ops()


def test_pipeline_refuses_an_unknown_disabled_pass_naming_a_close_match(run_pass):
    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    ctx = PassContext(run.ctx.profile, CompileOptions(disabled_passes=("fold_batchnorms",)), run.ctx.input_spec)
    with pytest.raises(OptionsError, match="fold_batchnorm'"):
        pipeline.run(run.gm, ctx)


def test_pipeline_without_fusion_runs_cleanup_only(run_pass):
    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    ctx = PassContext(run.ctx.profile, CompileOptions(fusion=False), run.ctx.input_spec)
    records = pipeline.run(run.gm, ctx).records
    assert "fusion" not in {r.stage for r in records}
    assert torch.ops.aten.batch_norm.default in run.ops()
    run.assert_same_numerics()


def test_pipeline_wraps_a_failing_pass_naming_it_and_the_passes_before(run_pass):
    def explode(gm, ctx):
        raise ValueError("boom")

    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    stages = (PIPELINE[0], Stage("broken", (explode,)))
    with pytest.raises(PassFailed) as info:
        pipeline.run(run.gm, run.ctx, stages)
    message = str(info.value)
    assert "explode" in message and "boom" in message and "fold_constants" in message
    assert "disabled_passes" in message


def test_a_failing_pass_names_the_node_it_was_at_and_the_users_source_line(run_pass):
    def trip_on_relu(gm, ctx):
        for node in gm.graph.nodes:
            if node.target is torch.ops.aten.relu.default:
                raise ValueError("cannot rewrite this relu")
        return PassResult(changed=False)

    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    relu = next(n for n in run.gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with pytest.raises(PassFailed) as info:
        pipeline.run(run.gm, run.ctx, (Stage("bad", (trip_on_relu,)),))
    where = info.value.where
    assert f"node {relu.name} (aten.relu.default)" in where
    assert "test_pipeline.py" in where and "in forward" in where  # Small.forward's line, where relu was called


def test_decide_only_passes_report_the_nodes_they_annotated_and_what_they_decided(run_pass):
    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    done = pipeline.run(run.gm, run.ctx)
    by_name = {r.name: r for r in done.records}
    ops = sum(n.op == "call_function" for n in run.gm.graph.nodes)
    assert not by_name["assign_precision"].changed and by_name["assign_precision"].annotated == ops
    assert not by_name["place_on_devices"].changed and by_name["place_on_devices"].annotated == ops
    assert set(done.decided["assign_precision"]) == {"plans", "alternatives", "race_runner_up"}


def test_pipeline_rejects_a_pass_that_loses_shape_meta(run_pass):
    def add_bare_node(gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_after(node):
            bare = gm.graph.call_function(torch.ops.aten.relu.default, (node,))
        node.replace_all_uses_with(bare)
        bare.args = (node,)
        return PassResult(changed=True)

    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassFailed, match="no shape meta"):
        pipeline.run(run.gm, run.ctx, (Stage("bad", (add_bare_node,)),))


def test_pipeline_rejects_a_pass_that_returns_no_result(run_pass):
    run = run_pass(Small(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(PassFailed, match="not PassResult"):
        pipeline.run(run.gm, run.ctx, (Stage("bad", (lambda gm, ctx: None,)),))


def test_pipeline_rejects_a_pass_that_pins_a_dynamic_size(run_pass):
    def compare_the_batch(gm, ctx):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        if x.meta["val"].shape[0] == 2:  # a guard on the symbolic batch: it becomes 2 for good
            pass
        return PassResult(changed=False)

    run = run_pass(Small(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: "batch"}})
    with pytest.raises(PassFailed, match="compare_the_batch.*'batch' of input 'x' \\(axis 0\\) was pinned to 2"):
        pipeline.run(run.gm, run.ctx, (Stage("bad", (compare_the_batch,)),))


def test_the_whole_pipeline_keeps_a_dynamic_batch_dynamic(run_pass):
    run = run_pass(Small(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: "batch"}})
    pipeline.run(run.gm, run.ctx)
    wider = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(run.gm(wider)[0], run.reference(wider)[0])
