"""Helpers for pass tests: capture a tiny model through the real frontend, run one pass through
the pipeline's own runner (its dead-code removal, lint, recompile and meta checks included)."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln.frontend.capture import capture
from kiln.hardware_profiles import load
from kiln.options import CompileOptions
from kiln.passes.context import PassContext
from kiln.passes import pipeline
from kiln.verify import TOLERANCE
from kiln.types import Precision


class PassRun:
    """A captured graph, an untouched copy for reference, and the result of one pass."""

    def __init__(self, model: torch.nn.Module, inputs: tuple, dynamic: dict | None = None):
        self.captured = capture(model, inputs, dynamic=dynamic)
        self.gm = self.captured.gm
        self.reference = copy.deepcopy(self.gm)
        self.inputs = self.captured.example_inputs
        self.ctx = PassContext(load("cpu-x86"), CompileOptions(), self.captured.input_spec)

    def apply(self, pass_fn):
        return pipeline.run_pass(pass_fn, self.gm, self.ctx)

    def ops(self) -> list:
        return [n.target for n in self.gm.graph.nodes if n.op == "call_function"]

    def assert_same_numerics(self) -> None:
        tol = TOLERANCE[Precision.FP32]
        with torch.no_grad():
            for got, want in zip(self.gm(*self.inputs), self.reference(*self.inputs)):
                torch.testing.assert_close(got, want, rtol=tol.rtol, atol=tol.atol)


@pytest.fixture
def run_pass():
    return PassRun
