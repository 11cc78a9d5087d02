"""2:4 masks and pruning (precision/sparsity.py) and the lowering that prunes a plan's weights."""

import torch
from torch import nn

from kiln.backends.tensorrt_config import is_2_4_sparse
from kiln.frontend.capture import capture
from kiln.ir import LayerPlan, PartitionGraph, PrecisionPlan, Scheme
from kiln.precision.lowering import with_lowered_weights
from kiln.precision.schemes import float_grid
from kiln.precision.sparsity import mask_2_4, prune_2_4


def test_the_2_4_mask_keeps_exactly_the_two_largest_magnitudes_of_every_four():
    weight = torch.tensor([[0.9, -0.1, 0.05, -1.2, 3.0, 2.0, -4.0, 1.0]])
    assert mask_2_4(weight).tolist() == [[True, False, False, True, True, False, True, False]]
    torch.manual_seed(0)
    big = torch.randn(64, 128)
    mask = mask_2_4(big)
    groups, kept = big.abs().reshape(-1, 4), mask.reshape(-1, 4)
    assert (kept.sum(1) == 2).all()
    # every kept weight is at least as large as every dropped one of its group
    smallest_kept = torch.where(kept, groups, torch.inf).amin(1)
    largest_dropped = torch.where(~kept, groups, -torch.inf).amax(1)
    assert (smallest_kept >= largest_dropped).all()


def test_a_convolution_is_pruned_along_its_input_channels_at_each_kernel_position():
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    pruned = prune_2_4(weight)
    assert is_2_4_sparse(pruned) and not is_2_4_sparse(weight)
    assert (pruned.movedim(1, -1).reshape(-1, 4) != 0).sum(1).eq(2).all()
    assert torch.equal(pruned[pruned != 0], weight[pruned != 0])  # kept weights are unchanged


def test_a_weight_whose_input_axis_is_not_a_multiple_of_four_is_refused():
    try:
        mask_2_4(torch.randn(4, 6))
    except ValueError as exc:
        assert "multiple of 4" in str(exc)
    else:
        raise AssertionError("a 6-wide input axis has no whole groups of 4")


def test_the_lowering_prunes_sparse_layers_before_rounding_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    original = model[0].weight.detach().clone()
    x = torch.randn(3, 64)
    captured = capture(model, (x,))
    names = [n for n in captured.gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    plans = [LayerPlan(names[0].name, "linear", str(names[0].args[1].target), Scheme.BF16, sparsity="2:4"),
             LayerPlan(names[1].name, "linear", str(names[1].args[1].target), Scheme.FP32)]
    graph = PartitionGraph("p0", captured.gm, captured.input_spec.names, captured.output_names, captured.example_inputs,
                           None, PrecisionPlan(plans))
    assert graph.precision.lossy and [p.node for p in graph.precision.sparse] == [names[0].name]
    lowered = with_lowered_weights(graph)
    weight = lowered.gm.get_parameter(str(names[0].args[1].target))
    assert is_2_4_sparse(weight)
    assert torch.equal(weight, float_grid(prune_2_4(original), torch.bfloat16).float())  # pruned, then on bf16's grid
    assert torch.equal(model[0].weight, original)  # the user's parameters are never written
    with torch.no_grad():
        want = model[2](torch.relu(nn.functional.linear(x, weight, model[0].bias)))
        torch.testing.assert_close(lowered.gm(x)[0], want)


def test_a_sparse_layer_left_to_eager_pytorch_is_reported_dense_since_eager_runs_the_captured_weight():
    from kiln.build.precision_report import record_plan
    from kiln.ir import EAGER, Partition, PartitionPlan
    from kiln.options import CompileOptions
    from kiln.report import Report

    plan = PrecisionPlan([LayerPlan("linear", "linear", "fc.weight", Scheme.FP16, sparsity="2:4", reason="fp16 fits")])
    graph = PartitionGraph("p0", torch.fx.GraphModule(nn.Module(), torch.fx.Graph()), (), (), (), None, plan)
    report = Report("m", "a100", "", [])
    record_plan(PartitionPlan([Partition(graph, "gpu", placed_backend=EAGER)], (), ()), CompileOptions(sparsity="2:4"),
                report, calibrated=True)
    (row,) = report.precision
    assert row["scheme"] == "fp32" and row["sparsity"] is None and "eagerly" in row["sparsity_reason"]
    assert not report.lowered and "0 of 1 layers pruned" in report.precision_summary
