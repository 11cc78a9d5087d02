"""Artifacts: save -> load gives the same model, in this process and in a fresh one.

One small Conv + Linear model with dict outputs is compiled once for the module (ONNX Runtime,
cpu-x86) and saved both as a single zip file and as a directory. The fresh-process check runs
`python -c` with only kiln and torch imported: the model's class is never needed to load an
artifact, because nothing in it is pickled.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

import kiln
from kiln import hardware_profiles
from kiln.artifact.manifest import FORMAT, SCHEMA_VERSION
from kiln.verify import TOLERANCE

FP32 = TOLERANCE[kiln.Precision.FP32]
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".npy", ".npz")


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.tanh(self.conv(x)).mean(dim=(2, 3))
        return {"logits": self.fc(features), "features": features}


def example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(eager model, compiled model, zip artifact path, directory artifact path)."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    compiled = kiln.optimize(model, "cpu-x86", example(), backend="onnxruntime")
    root = tmp_path_factory.mktemp("artifacts")
    file_path = compiled.save(root / "convnet.kiln")
    dir_path = compiled.save(str(root / "convnet_dir") + "/")
    return model, compiled, file_path, dir_path


def fresh_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)),)


def eager(model, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return model(*inputs)


def members(path: Path) -> dict[str, bytes]:
    """Every file of an artifact (zip or directory) by its artifact-relative posix path."""
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def looks_like_pickle(data: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) and a protocol byte, and end with STOP ('.').
    return len(data) >= 3 and data[0] == 0x80 and data[1] <= 5 and data[-1:] == b"."


# ---------------------------------------------------------------- writing

def test_save_to_a_plain_path_writes_one_zip_file(built):
    _, _, file_path, _ = built
    assert file_path.is_file()
    assert zipfile.is_zipfile(file_path)
    assert sorted(members(file_path)) == ["engines/p0.onnx", "manifest.json"]


def test_save_to_a_path_ending_in_slash_writes_a_directory(built):
    _, _, _, dir_path = built
    assert dir_path.is_dir()
    assert sorted(members(dir_path)) == ["engines/p0.onnx", "manifest.json"]


def test_save_to_an_existing_directory_without_slash_writes_a_directory(built, tmp_path):
    _, compiled, _, _ = built
    target = tmp_path / "existing"
    target.mkdir()
    written = compiled.save(target)
    assert (written / "manifest.json").is_file()
    assert (written / "engines" / "p0.onnx").is_file()


def test_save_over_an_existing_artifact_with_overwrite_replaces_it_and_leaves_no_partial_file(built, tmp_path):
    _, compiled, _, _ = built
    target = tmp_path / "model.kiln"
    compiled.save(target)
    before = target.stat().st_ino  # a replacement is a new file renamed in
    compiled.save(target, overwrite=True)
    assert zipfile.is_zipfile(target) and target.stat().st_ino != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.kiln"]


def test_zip_and_directory_artifacts_hold_the_same_files(built):
    _, _, file_path, dir_path = built
    assert members(file_path) == members(dir_path)


# ---------------------------------------------------------------- manifest and format

def test_manifest_records_format_schema_and_versions(built):
    _, _, file_path, _ = built
    manifest = json.loads(members(file_path)["manifest.json"])
    assert manifest["format"] == FORMAT
    assert manifest["schema_version"] == SCHEMA_VERSION
    versions = manifest["versions"]
    assert versions["kiln"] == kiln.__version__
    assert versions["torch"] == torch.__version__
    assert versions["onnxruntime"] == onnxruntime.__version__


def test_manifest_records_profile_name_and_digest(built):
    _, compiled, file_path, _ = built
    manifest = json.loads(members(file_path)["manifest.json"])
    assert manifest["profile"] == {"name": "cpu-x86", "digest": hardware_profiles.load("cpu-x86").digest}
    assert manifest["profile"] == compiled.profile


def test_manifest_records_the_input_spec(built):
    _, _, file_path, _ = built
    spec = json.loads(members(file_path)["manifest.json"])["input_spec"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in spec["tensors"]] == [("x", "float32", [2, 3, 8, 8])]


def test_manifest_lists_each_engine_file_with_its_sha256_and_size(built):
    _, _, file_path, _ = built
    files = members(file_path)
    manifest = json.loads(files["manifest.json"])
    assert [(e["partition"], e["backend"]) for e in manifest["engines"]] == [("p0", "onnxruntime")]
    listed = [item for engine in manifest["engines"] for item in engine["files"]]
    assert listed, "the manifest lists no engine file"
    for item in listed:
        data = files[item["path"]]
        assert item["sha256"] == hashlib.sha256(data).hexdigest()
        assert item["size"] == len(data)
    assert {item["path"] for item in listed} == {name for name in files if name != "manifest.json"}


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_artifact_contains_no_pickle_only_json_and_onnx(built, kind):
    _, _, file_path, dir_path = built
    files = members(file_path if kind == "file" else dir_path)
    for name, data in files.items():
        assert not name.endswith(PICKLE_SUFFIXES), f"{name} has a pickle-like suffix"
        assert not looks_like_pickle(data), f"{name} looks like a pickle"
    assert isinstance(json.loads(files["manifest.json"].decode("utf-8")), dict)
    engines = [name for name in files if name != "manifest.json"]
    assert engines and all(name.startswith("engines/") and name.endswith(".onnx") for name in engines)
    for name in engines:
        onnx.checker.check_model(onnx.load_from_string(files[name]))


# ---------------------------------------------------------------- loading in this process

@pytest.mark.parametrize("kind", ["file", "directory"])
def test_load_in_the_same_process_gives_identical_outputs(built, kind):
    _, compiled, file_path, dir_path = built
    loaded = kiln.load(file_path if kind == "file" else dir_path)
    inputs = fresh_inputs()
    want, got = compiled(*inputs), loaded(*inputs)
    assert sorted(got) == sorted(want) == ["features", "logits"]
    for name in want:
        assert torch.equal(got[name], want[name]), f"output {name!r} differs after save -> load"


def test_loaded_model_keeps_spec_profile_backends_and_output_structure(built):
    _, compiled, file_path, _ = built
    loaded = kiln.load(file_path)
    assert loaded.profile == compiled.profile
    assert loaded.backends == compiled.backends == {"p0": "onnxruntime"}
    assert loaded.input_spec.describe() == compiled.input_spec.describe()
    assert loaded.plan.output_names == compiled.plan.output_names
    out = loaded(*fresh_inputs())
    assert out.logits.shape == (2, 5) and out.features.shape == (2, 4)  # attribute access survives too


def test_loaded_model_refuses_inputs_that_do_not_match_the_saved_spec(built):
    _, _, file_path, _ = built
    loaded = kiln.load(file_path)
    with pytest.raises(kiln.InputMismatch, match="x"):
        loaded(torch.randn(2, 3, 9, 9))


def test_loaded_model_report_survives_the_round_trip(built):
    _, compiled, file_path, _ = built
    loaded = kiln.load(file_path)
    assert loaded.report.to_dict()["model"] == compiled.report.to_dict()["model"] == "ConvNet"
    assert loaded.report.to_dict()["verification"] == compiled.report.to_dict()["verification"]


def test_loading_an_archive_leaves_no_extracted_files_once_the_model_is_freed(built, tmp_path, monkeypatch):
    import gc
    import tempfile

    _, _, file_path, _ = built
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = kiln.load(file_path)
    loaded(*fresh_inputs())
    assert any(scratch.iterdir()), "expected the archive to be extracted under the temp dir"
    del loaded
    gc.collect()
    assert list(scratch.iterdir()) == []


# ---------------------------------------------------------------- loading in a fresh process

CHILD = """
import sys
import torch
import kiln

model = kiln.load(sys.argv[1])
inputs = torch.load(sys.argv[2])
outputs = model(*inputs)
assert "tests" not in sys.modules and not any("test_roundtrip" in name for name in sys.modules)
torch.save({name: value for name, value in outputs.items()}, sys.argv[3])
"""


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_load_in_a_fresh_process_matches_eager_within_fp32_tolerance(built, kind, tmp_path):
    model, _, file_path, dir_path = built
    inputs = fresh_inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(file_path if kind == "file" else dir_path),
         str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    got = torch.load(tmp_path / "outputs.pt")
    want = eager(model, inputs)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=FP32.rtol, atol=FP32.atol)
