"""Hostile and broken artifacts: each is refused with an ArtifactError that names the problem,
before any engine is loaded and without leaving extracted files behind.

Two small Linear models with different weights are compiled once for the module; each test
copies an artifact into tmp_path and breaks one thing. A spy on the backends' `load` proves
that no engine was handed to a runtime, and `tempfile.tempdir` points into tmp_path so the
tests can see what extraction left behind (and where a "../" member would have landed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import kiln
from artifact.small_model import Net
from kiln.backends.inductor import InductorBackend
from kiln.backends.onnxruntime import OnnxRuntimeBackend

ENGINE = "engines/p0.onnx"


def build(seed: int):
    torch.manual_seed(seed)
    return kiln.optimize(Net().eval(), "cpu-x86", (torch.randn(2, 8),), backend="onnxruntime")


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """Untouched artifacts: "a" and "b" (zip files of two different models), "a_dir" (directory)."""
    root = tmp_path_factory.mktemp("originals")
    a, b = build(0), build(1)
    return {"a": a.save(root / "a.kiln"), "b": b.save(root / "b.kiln"), "a_dir": a.save(str(root / "a_dir") + "/")}


@pytest.fixture(autouse=True)
def engine_loads(monkeypatch, tmp_path) -> list[str]:
    """Records every engine a backend is asked to load; redirects kiln's temp dirs into tmp_path."""
    calls: list[str] = []
    for cls in (OnnxRuntimeBackend, InductorBackend):
        original = cls.load

        def spy(self, directory, entry, settings, original=original):
            calls.append(f"{entry.backend}:{entry.files}")
            return original(self, directory, entry, settings)

        monkeypatch.setattr(cls, "load", spy)
    scratch = tmp_path / "scratch" / "tmp"
    scratch.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return calls


def refused(path: Path, engine_loads: list[str], *words: str) -> str:
    """Load `path`, expect an ArtifactError whose message contains every word (case-insensitive),
    no engine load, and nothing left in the scratch temp dir; return the message."""
    with pytest.raises(kiln.ArtifactError) as info:
        kiln.load(path)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert engine_loads == [], f"an engine was loaded before the refusal: {engine_loads}"
    scratch = Path(tempfile.tempdir)
    assert list(scratch.iterdir()) == [], f"refused load left files behind: {list(scratch.iterdir())}"
    return message


# ---------------------------------------------------------------- helpers that break artifacts

def read_zip(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def manifest_of(path: Path) -> dict:
    return json.loads(read_zip(path)["manifest.json"])


def with_manifest(source: Path, target: Path, edit) -> Path:
    """Copy a zip artifact, passing its manifest dict through `edit` (which mutates it)."""
    files = read_zip(source)
    manifest = json.loads(files["manifest.json"])
    edit(manifest)
    files["manifest.json"] = json.dumps(manifest).encode()
    return write_zip(target, files)


def flip_byte(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# ---------------------------------------------------------------- the spy works

def test_untouched_artifacts_load_and_the_engine_spy_sees_them(originals, engine_loads):
    for key in ("a", "a_dir"):
        model = kiln.load(originals[key])
        assert model(torch.randn(2, 8)).shape == (2, 4)
    assert len(engine_loads) == 2


# ---------------------------------------------------------------- not an artifact at all

def test_load_refuses_a_path_that_does_not_exist(tmp_path, engine_loads):
    refused(tmp_path / "nowhere.kiln", engine_loads, "no such file", "nowhere.kiln")


def test_load_refuses_a_file_of_random_bytes(tmp_path, engine_loads):
    path = tmp_path / "random.kiln"
    path.write_bytes(random.Random(0).randbytes(4096))
    refused(path, engine_loads, "not a zip archive")


def test_load_refuses_an_empty_file(tmp_path, engine_loads):
    path = tmp_path / "empty.kiln"
    path.write_bytes(b"")
    refused(path, engine_loads, "not a zip archive")


def test_load_refuses_a_zip_that_is_not_a_kiln_artifact(tmp_path, engine_loads):
    path = write_zip(tmp_path / "other.zip", {"README.txt": b"hello", "data/values.csv": b"1,2,3\n"})
    refused(path, engine_loads, "no manifest.json")


def test_load_refuses_a_zip_whose_manifest_json_is_not_a_kiln_manifest(tmp_path, engine_loads):
    path = write_zip(tmp_path / "other.zip", {"manifest.json": json.dumps({"name": "some other tool"}).encode()})
    refused(path, engine_loads, "not a kiln artifact", "format")


def test_load_refuses_a_directory_without_manifest(tmp_path, engine_loads):
    (tmp_path / "empty_dir").mkdir()
    refused(tmp_path / "empty_dir", engine_loads, "no manifest.json")


# ---------------------------------------------------------------- truncated or corrupted bytes

@pytest.mark.parametrize("keep", ["10%", "50%", "90%", "len-1", "len-22"])
def test_load_refuses_a_truncated_file(originals, tmp_path, engine_loads, keep):
    data = originals["a"].read_bytes()
    length = {"len-1": len(data) - 1, "len-22": len(data) - 22}.get(keep) or len(data) * int(keep[:-1]) // 100
    path = tmp_path / "truncated.kiln"
    path.write_bytes(data[:length])
    refused(path, engine_loads, "truncated")


def test_load_refuses_an_archive_whose_engine_bytes_fail_the_zip_crc(originals, tmp_path, engine_loads):
    # Flip one byte of the engine inside the archive as stored: the zip's own CRC catches it.
    data = originals["a"].read_bytes()
    engine = read_zip(originals["a"])[ENGINE]
    start = data.index(engine)
    path = tmp_path / "flipped.kiln"
    path.write_bytes(flip_byte(data, start + len(engine) // 2))
    refused(path, engine_loads, "CRC", ENGINE)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_load_refuses_engine_file_whose_checksum_differs(originals, tmp_path, engine_loads, where):
    # A rewritten zip (fresh, valid CRCs) with one engine byte changed and the manifest unchanged.
    files = read_zip(originals["a"])
    engine = files[ENGINE]
    files[ENGINE] = flip_byte(engine, {"first": 0, "middle": len(engine) // 2, "last": len(engine) - 1}[where])
    path = write_zip(tmp_path / "tampered.kiln", files)
    refused(path, engine_loads, "checksum", ENGINE)


def test_load_refuses_engine_files_swapped_between_two_artifacts(originals, tmp_path, engine_loads):
    ours, theirs = read_zip(originals["a"]), read_zip(originals["b"])
    assert ours[ENGINE] != theirs[ENGINE]
    ours[ENGINE] = theirs[ENGINE]
    path = write_zip(tmp_path / "swapped.kiln", ours)
    refused(path, engine_loads, "checksum", ENGINE)


def test_load_refuses_a_directory_artifact_whose_engine_file_is_missing(originals, tmp_path, engine_loads):
    path = Path(shutil.copytree(originals["a_dir"], tmp_path / "art"))
    (path / ENGINE).unlink()
    refused(path, engine_loads, "missing", ENGINE)


def test_load_refuses_a_directory_artifact_whose_engine_file_was_truncated(originals, tmp_path, engine_loads):
    path = Path(shutil.copytree(originals["a_dir"], tmp_path / "art"))
    data = (path / ENGINE).read_bytes()
    (path / ENGINE).write_bytes(data[: len(data) // 2])
    refused(path, engine_loads, "checksum", ENGINE)


def test_load_refuses_a_zip_artifact_whose_engine_member_is_missing(originals, tmp_path, engine_loads):
    files = read_zip(originals["a"])
    del files[ENGINE]
    path = write_zip(tmp_path / "no_engine.kiln", files)
    refused(path, engine_loads, "missing", ENGINE)


# ---------------------------------------------------------------- manifest contents

def test_load_refuses_a_manifest_that_is_not_json(originals, tmp_path, engine_loads):
    files = read_zip(originals["a"])
    files["manifest.json"] = files["manifest.json"][: len(files["manifest.json"]) // 2]
    path = write_zip(tmp_path / "bad_json.kiln", files)
    refused(path, engine_loads, "not valid JSON")


def test_load_refuses_a_manifest_that_is_not_utf8(originals, tmp_path, engine_loads):
    files = read_zip(originals["a"])
    files["manifest.json"] = b"\xff\xfe\x00garbage"
    path = write_zip(tmp_path / "bad_bytes.kiln", files)
    refused(path, engine_loads, "not valid JSON")


def test_load_refuses_a_directory_manifest_that_is_not_json(originals, tmp_path, engine_loads):
    path = Path(shutil.copytree(originals["a_dir"], tmp_path / "art"))
    (path / "manifest.json").write_text("{this is not json")
    refused(path, engine_loads, "not valid JSON")


@pytest.mark.parametrize("version", [
    999, 2, 0, -1, "1", None, 1.5,
    True,
])
def test_load_refuses_an_unsupported_schema_version(originals, tmp_path, engine_loads, version):
    path = with_manifest(originals["a"], tmp_path / "schema.kiln", lambda m: m.update(schema_version=version))
    refused(path, engine_loads, "schema version", repr(version))


def test_load_refuses_a_manifest_without_schema_version(originals, tmp_path, engine_loads):
    path = with_manifest(originals["a"], tmp_path / "schema.kiln", lambda m: m.pop("schema_version"))
    refused(path, engine_loads, "schema version")


@pytest.mark.parametrize("key", ["versions", "profile", "input_spec", "output_structure", "plan", "engines"])
def test_load_refuses_a_manifest_lacking_a_required_key(originals, tmp_path, engine_loads, key):
    path = with_manifest(originals["a"], tmp_path / "lacking.kiln", lambda m: m.pop(key))
    refused(path, engine_loads, "lacks", key)


def test_load_refuses_a_manifest_with_malformed_engine_entries(originals, tmp_path, engine_loads):
    path = with_manifest(originals["a"], tmp_path / "malformed.kiln", lambda m: m.update(engines=[{"partition": "p0"}]))
    refused(path, engine_loads, "malformed")




@pytest.mark.parametrize("section, value", [
    ("plan", []),
    ("plan", {"partitions": "p0"}),
    ("input_spec", "x"),
    ("input_spec", {}),
    ("report", "x"),
    ("versions", []),
    ("engines", "x"),
    ("engines", {"p0": {}}),
    ("output_structure", "garbage"),
    ("output_structure", "[1, {}]"),
])
def test_load_refuses_a_manifest_with_a_malformed_section(originals, tmp_path, engine_loads, section, value):
    path = with_manifest(originals["a"], tmp_path / "malformed.kiln", lambda m: m.update({section: value}))
    refused(path, engine_loads)


@pytest.mark.parametrize("field, value", [("files", ["engines/p0.onnx"]), ("files", "engines/p0.onnx")])
def test_load_refuses_malformed_engine_file_lists(originals, tmp_path, engine_loads, field, value):
    path = with_manifest(originals["a"], tmp_path / "malformed.kiln", lambda m: m["engines"][0].update({field: value}))
    refused(path, engine_loads, "malformed")


def test_load_refuses_an_engine_path_that_is_not_a_string(originals, tmp_path, engine_loads):
    path = with_manifest(originals["a"], tmp_path / "malformed.kiln",
                         lambda m: m["engines"][0]["files"][0].update(path=5))
    refused(path, engine_loads, "malformed")


def test_load_runs_only_engine_files_it_checked(originals, tmp_path, engine_loads):
    # The manifest points at decoy/p0.onnx (a faithful copy, so its checksum matches), while
    # engines/p0.onnx, which the backend actually opens, is another model's engine.
    files = read_zip(originals["a"])
    files["decoy/p0.onnx"] = files[ENGINE]
    files[ENGINE] = read_zip(originals["b"])[ENGINE]
    manifest = json.loads(files["manifest.json"])
    manifest["engines"][0]["files"][0]["path"] = "decoy/p0.onnx"
    files["manifest.json"] = json.dumps(manifest).encode()
    path = write_zip(tmp_path / "decoy.kiln", files)
    refused(path, engine_loads, "decoy/p0.onnx")


def test_load_refuses_archive_members_the_manifest_does_not_list(originals, tmp_path, engine_loads):
    files = read_zip(originals["a"])
    files["engines/p0.onnx.data"] = b"unlisted weights"
    path = write_zip(tmp_path / "unlisted.kiln", files)
    refused(path, engine_loads, "engines/p0.onnx.data")


def test_load_refuses_a_manifest_whose_plan_has_a_partition_without_engine(originals, tmp_path, engine_loads):
    files = read_zip(originals["a"])
    del files[ENGINE]
    manifest = json.loads(files["manifest.json"])
    manifest["engines"] = []
    files["manifest.json"] = json.dumps(manifest).encode()
    path = write_zip(tmp_path / "no_engine.kiln", files)
    refused(path, engine_loads, "p0", "no matching engine")


def test_load_refuses_a_manifest_naming_an_unknown_backend(originals, tmp_path, engine_loads):
    def edit(m):
        m["engines"][0]["backend"] = "tensorflow"
        m["plan"]["partitions"][0]["backend"] = "tensorflow"

    path = with_manifest(originals["a"], tmp_path / "unknown_backend.kiln", edit)
    refused(path, engine_loads, "tensorflow")


@pytest.mark.parametrize("engine_path", ["../../etc/passwd", "/etc/passwd", "engines/../../x.onnx", "engines\\..\\..\\x.onnx", ""])
def test_load_refuses_a_manifest_engine_path_outside_the_artifact(originals, tmp_path, engine_loads, engine_path):
    def edit(m):
        m["engines"][0]["files"][0]["path"] = engine_path

    path = with_manifest(originals["a"], tmp_path / "escape.kiln", edit)
    refused(path, engine_loads, "outside the artifact", repr(engine_path))


def test_load_refuses_a_directory_manifest_engine_path_outside_the_artifact(originals, tmp_path, engine_loads):
    path = Path(shutil.copytree(originals["a_dir"], tmp_path / "art"))
    manifest = json.loads((path / "manifest.json").read_text())
    # Point the engine at a real file outside the artifact whose checksum the manifest matches.
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((path / ENGINE).read_bytes())
    manifest["engines"][0]["files"][0]["path"] = "../outside.onnx"
    (path / "manifest.json").write_text(json.dumps(manifest))
    refused(path, engine_loads, "outside the artifact", "../outside.onnx")


@pytest.mark.parametrize("member", ["../evil", "/evil", "engines/../../evil", "..\\evil"])
def test_load_refuses_a_zip_member_named_outside_the_artifact_and_writes_nothing(originals, tmp_path, engine_loads, member):
    files = read_zip(originals["a"])
    files[member] = b"#!/bin/sh\necho owned\n"
    path = write_zip(tmp_path / "slip.kiln", files)
    refused(path, engine_loads, "outside the artifact", repr(member))
    leftovers = [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()] + \
        [p for p in tmp_path.glob("*evil*")]
    assert leftovers == []
    assert not Path("/evil").exists()


# ---------------------------------------------------------------- versions

def test_load_refuses_an_inductor_engine_built_with_another_torch(originals, tmp_path, engine_loads):
    def edit(m):
        m["versions"]["torch"] = "1.0.0"
        m["engines"][0]["backend"] = "inductor"

    path = with_manifest(originals["a"], tmp_path / "old_torch.kiln", edit)
    message = refused(path, engine_loads, "torch 1.0.0", "inductor", torch.__version__)
    assert "Fix:" in message


def test_load_accepts_an_onnx_engine_whatever_torch_built_it(originals, tmp_path, engine_loads):
    # ONNX is a portable format: the torch that exported it does not matter at load time.
    path = with_manifest(originals["a"], tmp_path / "old_torch_onnx.kiln", lambda m: m["versions"].update(torch="1.0.0"))
    model = kiln.load(path)
    assert model(torch.randn(2, 8)).shape == (2, 4)
    assert len(engine_loads) == 1


def test_artifact_error_message_has_what_where_and_fix(originals, tmp_path, engine_loads):
    files = read_zip(originals["a"])
    files[ENGINE] = flip_byte(files[ENGINE], 10)
    path = write_zip(tmp_path / "tampered.kiln", files)
    with pytest.raises(kiln.ArtifactError) as info:
        kiln.load(path)
    error = info.value
    assert error.where == str(path)
    assert "checksum" in error.what
    assert error.fix and "rebuild" in error.fix
    assert isinstance(error, kiln.KilnError)
    assert os.fspath(path) in str(error)


# ---------------------------------------------------------------- pinning and section boundaries

def test_a_pinned_digest_refuses_an_artifact_whose_manifest_was_rewritten(originals, tmp_path, engine_loads):
    from kiln.artifact import digest

    pin = digest(originals["a"])
    assert kiln.load(originals["a"], expected_digest=pin) is not None
    # an edit that keeps every checksum valid is still refused once the digest is pinned
    edited = with_manifest(originals["a"], tmp_path / "edited.kiln", lambda m: m["versions"].update(note="edited"))
    engine_loads.clear()
    with pytest.raises(kiln.ArtifactError, match="pinned"):
        kiln.load(edited, expected_digest=pin)
    assert engine_loads == []


def test_truncation_at_every_member_boundary_is_refused(originals, tmp_path, engine_loads):
    import zipfile

    data = originals["a"].read_bytes()
    with zipfile.ZipFile(originals["a"]) as archive:
        offsets = sorted({info.header_offset for info in archive.infolist()} |
                         {info.header_offset + len(info.FileHeader()) + info.compress_size for info in archive.infolist()})
    for offset in [o for o in offsets if 0 < o < len(data)]:
        cut = tmp_path / f"cut_{offset}.kiln"
        cut.write_bytes(data[:offset])
        with pytest.raises(kiln.ArtifactError):
            kiln.load(cut)
    assert engine_loads == []
