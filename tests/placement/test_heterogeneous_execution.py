"""Real heterogeneous execution on this machine: partitions built by different runtimes
(ONNX Runtime and Inductor on two CPU-kind devices; eager PyTorch for an op no exporter
handles), verified against eager, saved, and reloaded in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import kiln
from kiln.cli import main
from placement import custom_ops  # noqa: F401  (registers kiln_test::shifted_swish)
from placement.support import profile
from e2e_support import assert_fp32_close, eager_leaves, run_in_fresh_process

HERE = Path(__file__).parent


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        features = self.encoder(x)
        return {"logits": self.head(torch.tanh(features)), "features": features}


class WithCustomOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.outer(torch.ops.kiln_test.shifted_swish(self.inner(x)))


def _inputs(*shape, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def split_build(tmp_path_factory):
    torch.manual_seed(0)
    model = Split().eval()
    compiled = kiln.optimize(model, profile("two-cpu-runtimes"), _inputs(4, 12), pin={"head": "cpu_inductor"}, cache=False)
    path = compiled.save(tmp_path_factory.mktemp("split") / "split.kiln")
    return model, compiled, path


def test_a_model_split_across_onnxruntime_and_inductor_matches_eager(split_build):
    model, compiled, _ = split_build
    assert {p.backend for p in compiled.plan.partitions} == {"onnxruntime", "inductor"}
    assert {p.device for p in compiled.plan.partitions} == {"cpu_ort", "cpu_inductor"}
    fresh = _inputs(4, 12, seed=3)
    assert_fp32_close(eager_leaves(compiled, fresh), eager_leaves(model, fresh))
    assert all(v["ok"] for v in compiled.report.verification)


def test_the_split_model_reloads_in_a_fresh_process_with_the_same_outputs(split_build, tmp_path):
    model, _, path = split_build
    fresh = _inputs(4, 12, seed=5)
    assert_fp32_close(run_in_fresh_process(path, fresh, tmp_path), eager_leaves(model, fresh))
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert [p["backend"] for p in manifest["plan"]["partitions"]] == [e["backend"] for e in manifest["engines"]]


def test_inspect_shows_each_partition_with_estimated_and_measured_time_and_draws_html(split_build, tmp_path, capsys):
    _, _, path = split_build
    page = tmp_path / "report.html"
    assert main(["inspect", str(path), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    for partition in ("cpu_ort via onnxruntime", "cpu_inductor via inductor"):
        assert partition in out
    assert "est." in out and "measured" in out and "pinned to cpu_inductor" in out
    text = page.read_text()
    assert "<svg" in text and "cpu_inductor" in text and "<script" not in text and "http" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")


@pytest.fixture(scope="module")
def eager_build(tmp_path_factory):
    torch.manual_seed(0)
    model = WithCustomOp().eval()
    compiled = kiln.optimize(model, profile("cpu-onnxruntime-only"), _inputs(2, 8), cache=False)
    path = compiled.save(tmp_path_factory.mktemp("eager") / "custom.kiln")
    return model, compiled, path


def test_an_op_no_exporter_handles_runs_in_an_eager_partition_reported_by_name(eager_build):
    model, compiled, _ = eager_build
    assert [p.backend for p in compiled.plan.partitions] == ["onnxruntime", "eager", "onnxruntime"]
    assert any("runs eagerly in PyTorch" in n and "kiln_test.shifted_swish" in n for n in compiled.report.notes)
    fresh = _inputs(2, 8, seed=9)
    assert_fp32_close(eager_leaves(compiled, fresh), eager_leaves(model, fresh))


def test_the_eager_partition_is_saved_without_pickle_and_reloads_after_importing_its_op_library(eager_build, tmp_path):
    model, _, path = eager_build
    with zipfile.ZipFile(path) as archive:
        engine = next(n for n in archive.namelist() if n.endswith(".pt2"))
        with zipfile.ZipFile(archive.open(engine)) as program:
            sample = [n for n in program.namelist() if "/sample_inputs/" in n]
            assert all(program.getinfo(n).file_size == 0 for n in sample)
    fresh = _inputs(2, 8, seed=11)
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(HERE)!r})
        import custom_ops  # the op library must be imported before kiln.load
        import kiln
        compiled = kiln.load(sys.argv[1])
        torch.save([compiled(*torch.load(sys.argv[2]))], sys.argv[3])
    """)
    torch.save(list(fresh), tmp_path / "in.pt")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_fp32_close(torch.load(tmp_path / "out.pt"), eager_leaves(model, fresh))


def test_loading_an_eager_partition_without_its_op_library_says_to_import_it(eager_build):
    _, _, path = eager_build
    script = f"import kiln\ntry:\n    kiln.load({str(path)!r})\nexcept kiln.ArtifactError as e:\n    print(e)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "import the library registering any custom op" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "kiln_test.shifted_swish" in done.stdout
