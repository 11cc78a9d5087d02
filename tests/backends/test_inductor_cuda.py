"""Inductor on a CUDA GPU, end to end for the h100 profile: AOTInductor packages built for the
GPU, verified against eager on CPU, saved and loaded. Skipped (with the reason) on machines
without CUDA; run it on an NVIDIA machine with `pytest -rs tests/backends/test_inductor_cuda.py`."""

import re

import pytest
import torch
from torch import nn

import kiln
from kiln.types import Precision
from kiln.verify import TOLERANCE

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine", allow_module_level=True)

TOL = TOLERANCE[Precision.FP32]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return torch.softmax(self.fc(y), -1)


@pytest.fixture
def block():
    torch.manual_seed(0)
    model = Block()
    model.train()(torch.randn(8, 3, 16, 16))  # non-trivial BatchNorm statistics
    return model.eval()


def _detail(compiled) -> str:
    return next(c.detail for c in compiled.report.candidates if c.status == "chosen")


def test_static_model_builds_a_cuda_package_replayed_as_a_cuda_graph(block, tmp_path):
    x = torch.randn(4, 3, 16, 16)
    compiled = kiln.optimize(block, "h100", (x,), backend="inductor")
    assert compiled.backends == {"p0": "inductor"}
    detail = _detail(compiled)
    assert "CUDA graph replay" in detail and re.search(r"\d+ generated kernels", detail), detail
    for _ in range(2):  # a replay must read this call's inputs, not the captured ones
        fresh = torch.randn(4, 3, 16, 16)
        torch.testing.assert_close(compiled(fresh), block(fresh), rtol=TOL.rtol, atol=TOL.atol)
    on_gpu = compiled(fresh.cuda())
    assert on_gpu.is_cuda
    artifact = compiled.save(tmp_path / "block.kiln")
    reloaded = kiln.load(artifact)
    torch.testing.assert_close(reloaded(fresh), compiled(fresh), rtol=0, atol=0)


def test_dynamic_batch_runs_without_a_cuda_graph_at_other_sizes(block):
    compiled = kiln.optimize(block, "h100", (torch.randn(4, 3, 16, 16),), dynamic={"x": {0: "batch"}}, backend="inductor")
    assert "no CUDA graph (dynamic shapes)" in _detail(compiled)
    for batch in (1, 7):
        x = torch.randn(batch, 3, 16, 16)
        torch.testing.assert_close(compiled(x), block(x), rtol=TOL.rtol, atol=TOL.atol)


def test_autotune_builds_with_max_autotune_and_still_matches_eager(block):
    x = torch.randn(4, 3, 16, 16)
    compiled = kiln.optimize(block, "h100", (x,), backend="inductor", autotune=True)
    assert "max-autotune" in _detail(compiled)
    torch.testing.assert_close(compiled(x), block(x), rtol=TOL.rtol, atol=TOL.atol)


def test_minilm_on_h100_matches_eager_and_reloads(tmp_path):
    from kiln.examples import models

    try:
        model, inputs = models.minilm(batch=2, seq=64)
    except models.MissingExample as exc:
        pytest.skip(str(exc))
    compiled = kiln.optimize(model, "h100", inputs, backend="inductor")
    assert all(check["ok"] for check in compiled.report.verification)
    with torch.no_grad():
        want = model(*inputs).last_hidden_state
    torch.testing.assert_close(compiled(*inputs).last_hidden_state, want, rtol=TOL.rtol, atol=TOL.atol)
    reloaded = kiln.load(compiled.save(tmp_path / "minilm.kiln"))
    torch.testing.assert_close(reloaded(*inputs).last_hidden_state, want, rtol=TOL.rtol, atol=TOL.atol)
