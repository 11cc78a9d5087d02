"""Shared pieces for backend tests: a tiny partition and build settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.backends.base import BackendSettings
from kiln.ir import PartitionGraph
from kiln.frontend.capture import capture
from kiln.frontend.input_spec import export_dynamic_shapes
from kiln.hardware_profiles import load


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.nn.functional.gelu(self.conv(x)).mean((2, 3))
        return {"logits": self.fc(self.norm(y)), "features": y}


def make_partition(model: nn.Module, inputs: tuple, dynamic=None) -> tuple[PartitionGraph, object]:
    captured = capture(model, inputs, dynamic=dynamic)
    graph = PartitionGraph("p0", captured.gm, captured.input_spec.names, captured.output_names,
                           captured.example_inputs, export_dynamic_shapes(captured.input_spec))
    return graph, captured


@pytest.fixture
def settings(tmp_path):
    return BackendSettings(load("cpu-x86").primary, threads=2, workdir=tmp_path)


@pytest.fixture
def convnet_partition():
    torch.manual_seed(0)
    return make_partition(ConvNet().eval(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: "batch"}})
