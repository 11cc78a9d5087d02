"""One capability answer per backend: placement, backend selection and the precision pass all
ask the backend's own table, so changing the table changes all three answers together."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kiln.backends.base import BackendSettings
from kiln.backends.onnxruntime import OnnxRuntimeBackend
from kiln.build import select
from kiln.errors import BackendUnavailable
from kiln.frontend.capture import capture
from kiln.frontend.input_spec import export_dynamic_shapes
from kiln.hardware_profiles import load
from kiln.ir import DECISION_META, PartitionGraph
from kiln.options import CompileOptions
from kiln.passes.assign_precision import auto_candidates
from kiln.passes.context import PassContext
from kiln.passes.pipeline import run_pass
from kiln.passes.place_on_devices import place_on_devices
from kiln.types import DeviceKind, NodeDecision, Precision


@pytest.fixture
def ort_only(tmp_path):
    path = tmp_path / "ort-only.yaml"
    path.write_text("extends: cpu-x86\nname: ort-only\ndevices:\n  cpu:\n    backends: [onnxruntime]\n")
    return load(path)


def _linear_at(precision: Precision):
    captured = capture(nn.Sequential(nn.Linear(16, 16)).eval(), (torch.randn(2, 16),))
    linear = next(n for n in captured.gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    return captured, linear


def _answers(profile, tmp_path) -> dict[str, object]:
    """What each consumer says about running a linear layer at bf16 on the profile's CPU with
    ONNX Runtime, the one backend it lists."""
    device = profile.primary
    captured, linear = _linear_at(Precision.BF16)
    # placement: the node at bf16 (every node, as precision="bf16" without the precision pass)
    ctx = PassContext(profile, CompileOptions(precision="bf16"), captured.input_spec)
    run_pass(place_on_devices, captured.gm, ctx)
    placed = linear.meta[DECISION_META].backend
    # selection: the partition's node at bf16; the candidate is checked, never built
    for node in captured.gm.graph.nodes:
        if node.op == "call_function":
            node.meta[DECISION_META] = NodeDecision(precision=Precision.BF16)
    graph = PartitionGraph("p0", captured.gm, captured.input_spec.names, captured.output_names,
                           captured.example_inputs, export_dynamic_shapes(captured.input_spec))
    settings = BackendSettings(device, 1, tmp_path)
    try:
        chosen = select.select_engine(graph, ("onnxruntime",), "prefer", settings, lambda engine: [], 0.01, False,
                                      build=lambda backend: (object(), []))
        selected = chosen.backend
    except BackendUnavailable as exc:
        selected = f"refused: {exc.what}"
    # precision: which precisions "auto" may assign with this backend list
    candidates = auto_candidates(device, ("onnxruntime",), calibrated=False)
    return {"placement": placed, "selection": selected, "precision": Precision.BF16 in candidates}


def test_placement_selection_and_precision_refuse_together_what_the_table_refuses(ort_only, tmp_path):
    answers = _answers(ort_only, tmp_path)
    reason = OnnxRuntimeBackend().supports(_linear_at(Precision.BF16)[1], ort_only.primary, Precision.BF16).reason
    assert "does not lower bf16 on cpu" in reason
    assert answers["placement"] == "eager"  # no listed backend runs it: PyTorch runs it, reported
    assert answers["selection"].startswith("refused") and reason in answers["selection"]
    assert answers["precision"] is False


def test_placement_selection_and_precision_accept_together_what_the_table_accepts(ort_only, tmp_path, monkeypatch):
    table = OnnxRuntimeBackend.capabilities
    wider = dataclasses.replace(table, precisions={**table.precisions,
                                                   DeviceKind.CPU: table.precisions[DeviceKind.CPU] | {Precision.BF16}})
    monkeypatch.setattr(OnnxRuntimeBackend, "capabilities", wider)
    assert _answers(ort_only, tmp_path) == {"placement": "onnxruntime", "selection": "onnxruntime", "precision": True}


def test_moe_experts_go_to_the_eager_partition_on_every_cpu_backend():
    """Inductor could call the op inside its graph, and would then take the whole model (the
    ops around the experts too, which OpenVINO or ONNX Runtime run faster): no backend takes it."""
    from kiln.backends import registry
    from kiln.frontend.moe_op import MOE_EXPERTS

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Parameter(torch.randn(4, 16, 8)), nn.Parameter(torch.randn(4, 8, 8))

        def forward(self, x, index, weights):
            return torch.ops.kiln.moe_experts(x, index, weights, self.up, self.down, None, None, True, False, "silu")

    inputs = (torch.randn(6, 8), torch.randint(0, 4, (6, 2)), torch.rand(6, 2))
    captured = capture(Experts().eval(), inputs)
    node = next(n for n in captured.gm.graph.nodes if n.target is MOE_EXPERTS)
    cpu = load("cpu-x86").devices["cpu"]
    for name in ("inductor", "onnxruntime", "openvino"):
        assert not registry.get(name).capabilities.supports(node, cpu).ok, name
