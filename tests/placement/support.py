"""Shared pieces for placement tests: test profiles, tiny models, and running the placement
pass alone on a captured graph."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kiln.frontend.capture import capture
from kiln.hardware_profiles import load
from kiln.options import CompileOptions
from kiln.passes.context import PassContext
from kiln.passes.pipeline import run_pass
from kiln.passes.place_on_devices import place_on_devices
from kiln.types import NodeDecision

PROFILES = Path(__file__).parent / "profiles"


def profile(name: str):
    return load(PROFILES / f"{name}.yaml")


def place(model: nn.Module, inputs: tuple, profile_name: str, plan_only: bool = True, **options):
    """Capture `model` and run place_on_devices alone, through the pipeline's runner; returns (captured, result)."""
    captured = capture(model.eval(), inputs)
    ctx = PassContext(profile(profile_name), CompileOptions(**options), captured.input_spec, plan_only=plan_only)
    return captured, run_pass(place_on_devices, captured.gm, ctx)


def decisions(gm, op=None) -> dict[str, NodeDecision]:
    return {n.name: n.meta["kiln"] for n in gm.graph.nodes if n.op == "call_function" and "kiln" in n.meta
            and (op is None or n.target == op)}


class HeavyMLP(nn.Module):
    """Large matmuls (compute-heavy) on a small input: worth shipping to a fast device."""

    def __init__(self, width: int = 1024):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.classifier = nn.Linear(width, 8)

    def forward(self, x):
        return self.classifier(self.body(x))


def heavy_inputs(width: int = 1024, batch: int = 256) -> tuple[torch.Tensor]:
    return (torch.randn(batch, width, generator=torch.Generator().manual_seed(0)),)
