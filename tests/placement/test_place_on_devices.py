"""place_on_devices decides where each node runs (planning only: nothing is compiled), on
synthetic profiles with a fast GPU and a slow host CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln
from kiln.errors import BackendUnavailable, OptionsError
from placement import custom_ops  # noqa: F401  (registers kiln_test::shifted_swish)
from placement.support import HeavyMLP, decisions, heavy_inputs, place, profile

LINEAR = torch.ops.aten.linear.default


class SwishBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(256, 256)

    def forward(self, x):
        return self.fc(torch.ops.kiln_test.shifted_swish(self.fc(x)))


def test_a_node_no_gpu_backend_supports_goes_to_the_cpu_with_the_reason():
    captured, _ = place(SwishBlock(), (torch.randn(64, 256),), "gpu-and-host")
    swish = decisions(captured.gm, torch.ops.kiln_test.shifted_swish.default)
    (decision,) = swish.values()
    assert decision.device == "cpu" and decision.backend == "inductor"
    assert any("not on gpu" in r and "ONNX exporter has no conversion" in r for r in decision.reasons)


def test_a_compute_heavy_subgraph_goes_to_the_faster_device():
    captured, result = place(HeavyMLP(), heavy_inputs(), "gpu-and-host")
    linears = decisions(captured.gm, LINEAR)
    assert {d.device for d in linears.values()} == {"gpu"}
    assert all(d.backend == "onnxruntime" for d in linears.values())
    assert result.counts.get("gpu/onnxruntime", 0) >= 3 and not result.changed


def test_a_transfer_dominated_split_is_avoided():
    captured, _ = place(HeavyMLP(), heavy_inputs(), "slow-link")
    assert {d.device for d in decisions(captured.gm).values()} == {"cpu"}


def test_a_cheap_node_between_gpu_nodes_stays_on_the_gpu_rather_than_bouncing_tensors():
    captured, _ = place(HeavyMLP(), heavy_inputs(), "gpu-and-host")
    relu = decisions(captured.gm, torch.ops.aten.relu.default)
    assert {d.device for d in relu.values()} == {"gpu"}


def test_weights_beyond_device_memory_stay_on_the_host_and_the_rest_fits():
    captured, result = place(HeavyMLP(width=256), heavy_inputs(256), "small-gpu-memory")
    linears = decisions(captured.gm, LINEAR)
    on_gpu = [name for name, d in linears.items() if d.device == "gpu"]
    on_cpu = [name for name, d in linears.items() if d.device == "cpu"]
    assert on_gpu and on_cpu  # 0.3 MB holds one 256x256 layer (0.26 MB), not three
    gpu_weights = {str(a.target) for n in captured.gm.graph.nodes if n.name in on_gpu
                   for a in n.all_input_nodes if a.op == "get_attr"}
    assert sum(captured.gm.get_parameter(t).numel() * 4 for t in gpu_weights) <= 0.0003e9
    assert any("doesn't fit on gpu" in r for name in on_cpu for r in linears[name].reasons)
    assert any("doesn't fit" in s.reason for s in result.skipped)


def test_a_pin_wins_over_the_cost_model():
    captured, _ = place(HeavyMLP(), heavy_inputs(), "gpu-and-host", pin={"classifier": "cpu"})
    linears = decisions(captured.gm, LINEAR)
    classifier = [d for d in linears.values() if any("pinned" in r for r in d.reasons)]
    assert len(classifier) == 1 and classifier[0].device == "cpu"
    assert sum(d.device == "gpu" for d in linears.values()) == 2


def test_a_pin_to_an_unknown_device_or_matching_nothing_is_an_error_naming_the_choices():
    with pytest.raises(OptionsError, match="gpu, cpu"):
        place(HeavyMLP(), heavy_inputs(), "gpu-and-host", pin={"classifier": "tpu"})
    with pytest.raises(OptionsError, match="(?s)matches no node.*did you mean 'classifier'"):
        place(HeavyMLP(), heavy_inputs(), "gpu-and-host", pin={"clasifier": "cpu"})


def test_an_op_no_backend_supports_anywhere_falls_back_to_eager_on_the_host_with_its_name():
    captured, result = place(SwishBlock(), (torch.randn(8, 256),), "cpu-onnxruntime-only")
    (decision,) = decisions(captured.gm, torch.ops.kiln_test.shifted_swish.default).values()
    assert decision.device == "cpu" and decision.backend == "eager"
    assert any("no backend supports kiln_test.shifted_swish" in r for r in decision.reasons)
    assert any("eager fallback" in s.reason for s in result.skipped)
    with pytest.raises(BackendUnavailable, match="shifted_swish"):
        place(SwishBlock(), (torch.randn(8, 256),), "cpu-onnxruntime-only", eager_fallback=False)


def test_building_refuses_a_device_this_machine_lacks_while_planning_places_on_it():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model, inputs = HeavyMLP().eval(), heavy_inputs()
    with pytest.raises(kiln.BackendUnavailable, match="plan"):
        kiln.optimize(model, profile("gpu-and-host"), inputs)
    planned = kiln.plan(model, profile("gpu-and-host"), inputs)
    assert "gpu" in {p.device for p in planned.plan.partitions}
    assert "planned, not built" in planned.render()


def test_placement_reasons_that_differ_only_in_figures_are_grouped_with_the_range_of_those_figures():
    from kiln.report import Report

    def record(node, us):
        return {"node": node, "device": "gpu", "backend": "tensorrt",
                "reasons": [f"kept with its neighbours: cpu would take {us} us but moving tensors costs more"]}

    report = Report("M", "p", "x", placement=[record("add", 3.5), record("gelu", 12.25), record("mul", 7.0)])
    (line,) = [ln for ln in report.render_placement() if "kept with" in ln]
    assert line == ("  add, gelu, mul -> gpu via tensorrt: kept with its neighbours: "
                    "cpu would take 3.5-12.25 us but moving tensors costs more")
