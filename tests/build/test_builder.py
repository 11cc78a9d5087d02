"""The real build step the precision search drives: each call re-decides precision and
placement through the pass pipeline with the plan it is given, builds real engines, verifies
them against eager and reports that plan."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kiln
from kiln.build import precision_search
from kiln.build.builder import Builder
from kiln.build.inputs import flat_calibration, verification_draws
from kiln.frontend.capture import capture
from kiln.hardware_profiles import load
from kiln.ir import Scheme
from kiln.options import CompileOptions
from kiln.passes import pipeline
from kiln.passes.context import PassContext
from kiln.report import Report
from kiln.verify import output_error


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 16)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _draw(seed: int) -> torch.Tensor:
    return torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def builder():
    torch.manual_seed(0)
    model = Net().eval()
    opts = CompileOptions(backend="onnxruntime", precision="int8", calibration=[_draw(10 + k) for k in range(4)],
                          accuracy_budget=kiln.Budget(min_cosine=0.99), isolate=False, cache=False)
    profile = load("cpu-x86")
    captured = capture(model, (_draw(0),))
    ctx = PassContext(profile, opts, captured.input_spec, captured.example_inputs, flat_calibration(captured, opts))
    decided = pipeline.run(captured.gm, ctx)
    report = Report("Net", profile.name, captured.input_spec.describe(), list(captured.output_names), passes=decided.records)
    draws = verification_draws(captured, opts, ctx.calibration)
    return model, Builder(model, captured, profile, ctx, draws, report), decided.decided["assign_precision"]["plans"]


def test_a_build_with_other_layer_plans_decides_builds_and_reports_exactly_those_plans(builder):
    model, build, decided = builder
    first = build.build()
    assert {row["node"]: row["scheme"] for row in first.report.precision} == {n: str(p.scheme) for n, p in decided.items()}
    assert any(p.scheme == Scheme.INT8_STATIC for p in decided.values())
    backed_off, raised = precision_search.most_sensitive_raised(decided, 0.5, "back to fp32: test")
    again = build.build(backed_off)
    rows = {row["node"]: row for row in again.report.precision}
    assert {n: r["scheme"] for n, r in rows.items()} == {n: str(p.scheme) for n, p in backed_off.items()}
    assert sum(r["reason"] == "back to fp32: test" for r in rows.values()) == raised >= 1
    assert [r.name for r in again.report.passes[-2:]] == ["assign_precision", "place_on_devices"]  # decided afresh
    with torch.no_grad():
        assert output_error(again(_draw(5)), model(_draw(5)))[0] >= 0.99  # verified, and it runs the new plan
    assert first.report is not again.report and first.report.precision != again.report.precision
