"""partition_graph: per-(device, backend) partitions in an acyclic order, each a graph over named
tensors whose chained results equal the whole graph's (planning only, nothing compiled)."""

from __future__ import annotations

import torch
from torch import nn

from kiln.frontend.capture import capture
from kiln.frontend.input_spec import export_dynamic_shapes
from kiln.options import CompileOptions
from kiln.passes import pipeline
from kiln.passes.context import PassContext
from kiln.placement.partition import partition_graph
from placement.support import profile


class TwoBranches(nn.Module):
    """Two independent branches joined at the end; `side` is pinned elsewhere."""

    def __init__(self):
        super().__init__()
        self.main_a, self.main_b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.side = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        main = self.main_b(torch.relu(self.main_a(x)))
        side = torch.tanh(self.side(x))
        return {"out": self.head(main + side), "side": side}


def _plan(model, inputs, profile_name, **options):
    captured = capture(model.eval(), inputs)
    ctx = PassContext(profile(profile_name), CompileOptions(**options), captured.input_spec, plan_only=True)
    pipeline.run(captured.gm, ctx)
    plan = partition_graph(captured.gm, ctx.profile, captured.input_spec, captured.output_names, captured.example_inputs,
                      export_dynamic_shapes(captured.input_spec))
    return captured, plan


def _run(plan, inputs):
    values = dict(zip(plan.input_names, inputs))
    for partition in plan.partitions:
        with torch.no_grad():
            values.update(zip(partition.graph.output_names, partition.graph.gm(*(values[n] for n in partition.graph.input_names))))
    return [values[n] for n in plan.sources()]


def test_pinned_branch_becomes_its_own_partition_and_the_chain_equals_the_graph():
    torch.manual_seed(0)
    model, inputs = TwoBranches(), (torch.randn(3, 16),)
    captured, plan = _plan(model, inputs, "two-cpu-runtimes", pin={"side": "cpu_inductor"})
    devices = [p.device for p in plan.partitions]
    assert devices.count("cpu_inductor") == 1 and "cpu_ort" in devices
    assert {p.placed_backend for p in plan.partitions} == {"onnxruntime", "inductor"}
    for got, want in zip(_run(plan, captured.example_inputs), captured.gm(*captured.example_inputs)):
        torch.testing.assert_close(got, want)


def test_nodes_of_one_device_on_independent_branches_merge_into_one_partition():
    model, inputs = TwoBranches(), (torch.randn(3, 16),)
    _, plan = _plan(model, inputs, "two-cpu-runtimes", pin={"side": "cpu_inductor"})
    # main_a, main_b (ort) and side (inductor) are independent: ort before and after side would be 3 partitions
    # only if the order interleaved them; the sticky order keeps main's ops together.
    assert len(plan.partitions) <= 3
    ort_partitions = [p for p in plan.partitions if p.device == "cpu_ort"]
    first = ort_partitions[0].graph.gm.graph
    assert sum(n.target == torch.ops.aten.linear.default for n in first.nodes) >= 2


def test_partitions_read_only_model_inputs_or_earlier_partitions_outputs():
    _, plan = _plan(TwoBranches(), (torch.randn(3, 16),), "two-cpu-runtimes", pin={"main_b": "cpu_inductor"})
    known = set(plan.input_names)
    for partition in plan.partitions:
        assert set(partition.graph.input_names) <= known
        known |= set(partition.graph.output_names)
    assert set(plan.sources()) <= known


def test_every_op_node_has_a_placement_record_with_partition_and_estimate():
    captured, plan = _plan(TwoBranches(), (torch.randn(3, 16),), "two-cpu-runtimes", pin={"side": "cpu_inductor"})
    ops = [n.name for n in captured.gm.graph.nodes if n.op == "call_function"]
    assert sorted(r["node"] for r in plan.placement) == sorted(ops)
    assert all(p.estimated_ms and p.estimated_ms > 0 for p in plan.partitions)


def test_one_device_keeps_the_whole_graph_as_one_partition():
    captured, plan = _plan(TwoBranches(), (torch.randn(3, 16),), "cpu-onnxruntime-only")
    assert len(plan.partitions) == 1 and plan.partitions[0].graph.gm is captured.gm
