"""Zip artifacts are checked against their manifest from the zip directory before anything is
extracted, and each member is extracted with a cap at its manifest size.

The temp folder kiln extracts into is redirected (tempfile.mkdtemp) to a folder the test
controls, and its size is recorded when kiln removes it after a refusal: that is the most a
refused artifact ever wrote to disk.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import kiln
from artifact.small_model import Net

ENGINE = "engines/p0.onnx"
MiB = 1 << 20


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    compiled = kiln.optimize(Net().eval(), "cpu-x86", (torch.randn(2, 8),), backend="onnxruntime")
    return compiled.save(tmp_path_factory.mktemp("bombs") / "a.kiln")


@pytest.fixture
def extraction(monkeypatch, tmp_path) -> dict:
    """kiln's temp folders land in tmp_path/extract; `peak` is the largest size (bytes) any of
    them had when it was removed."""
    root = tmp_path / "extract"
    root.mkdir()
    seen = {"peak": 0, "folders": []}
    real_mkdtemp, real_rmtree = tempfile.mkdtemp, shutil.rmtree

    def mkdtemp(*args, **kwargs):
        kwargs["dir"] = str(root)
        folder = real_mkdtemp(*args, **kwargs)
        seen["folders"].append(Path(folder))
        return folder

    def rmtree(path, *args, **kwargs):
        if Path(path).is_dir() and Path(path).parent == root:
            seen["peak"] = max(seen["peak"], sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return seen


def test_an_unlisted_400_mb_member_is_refused_before_any_of_it_is_written(artifact, tmp_path, extraction):
    path = tmp_path / "bomb.kiln"
    with zipfile.ZipFile(artifact) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as out:
        for name in src.namelist():
            out.writestr(name, src.read(name))
        with out.open("engines/zeros.bin", "w", force_zip64=True) as stream:
            block = bytes(MiB)
            for _ in range(400):
                stream.write(block)
    assert path.stat().st_size < 2 * MiB  # small on disk, 400 MB unpacked
    with pytest.raises(kiln.ArtifactError, match="engines/zeros.bin"):
        kiln.load(path)
    assert extraction["peak"] < MiB, f"{extraction['peak']} bytes were extracted before the refusal"
    assert all(not folder.exists() for folder in extraction["folders"])


def lie_about_size(data: bytes, member: str, declared: int) -> bytes:
    """The zip with `member`'s uncompressed size in the central directory set to `declared`
    (the local header and the data stay as they were)."""
    entry = data.find(b"PK\x01\x02")
    while data[entry + 46:entry + 46 + struct.unpack_from("<H", data, entry + 28)[0]] != member.encode():
        entry = data.find(b"PK\x01\x02", entry + 4)
        assert entry > 0, f"{member} has no central directory entry"
    return data[:entry + 24] + struct.pack("<I", declared) + data[entry + 28:]


def test_a_listed_member_whose_zip_directory_size_lies_is_refused_before_extraction(artifact, tmp_path, extraction):
    manifest = json.loads(zipfile.ZipFile(artifact).read("manifest.json"))
    size = next(f["size"] for e in manifest["engines"] for f in e["files"] if f["path"] == ENGINE)
    path = tmp_path / "lying.kiln"
    path.write_bytes(lie_about_size(artifact.read_bytes(), ENGINE, size + 4096))
    assert zipfile.ZipFile(path).getinfo(ENGINE).file_size == size + 4096
    with pytest.raises(kiln.ArtifactError) as info:
        kiln.load(path)
    assert ENGINE in str(info.value) and str(size + 4096) in str(info.value) and str(size) in str(info.value)
    assert extraction["peak"] == 0


def test_a_manifest_declaring_more_than_64_mib_is_refused_before_it_is_read(artifact, tmp_path, extraction):
    files = {name: zipfile.ZipFile(artifact).read(name) for name in zipfile.ZipFile(artifact).namelist()}
    manifest = json.loads(files["manifest.json"])
    manifest["padding"] = " " * (65 * MiB)  # a valid manifest, only too large
    path = tmp_path / "big_manifest.kiln"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        out.writestr("manifest.json", json.dumps(manifest))
        out.writestr(ENGINE, files[ENGINE])
    with pytest.raises(kiln.ArtifactError, match="manifest.json declares .* more than the 64 MiB"):
        kiln.load(path)


def test_a_load_writes_only_the_listed_engine_files_at_their_listed_sizes(artifact, extraction):
    loaded = kiln.load(artifact)
    [folder] = extraction["folders"]
    manifest = json.loads(zipfile.ZipFile(artifact).read("manifest.json"))
    listed = {f["path"]: f["size"] for e in manifest["engines"] for f in e["files"]}
    written = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    assert written == listed
    del loaded
