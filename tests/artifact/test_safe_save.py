"""Saving never deletes what kiln did not write, and replaces an artifact only when asked, atomically.

Two small Linear models with different weights (so their outputs tell which one an artifact
holds) are compiled once for the module. An existing path that is not a kiln artifact is
refused whatever `overwrite` says; an existing artifact is replaced only with overwrite=True;
a save that fails halfway leaves the old artifact as it was and no temporary file behind.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

import kiln
from artifact.small_model import Net

save_module = sys.modules["kiln.artifact.save"]  # the module (kiln.artifact.save is also the function's name)

X = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def models():
    """(old, new): two compiled models whose outputs differ."""
    built = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        built.append(kiln.optimize(Net().eval(), "cpu-x86", (torch.randn(2, 8),), backend="onnxruntime"))
    assert not torch.equal(built[0](X), built[1](X))
    return tuple(built)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(root: Path) -> Path:
    folder = root / "work"
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "data" / "values.csv").write_text("1,2,3\n")
    return folder


# ---------------------------------------------------------------- what is not kiln's is never replaced

@pytest.mark.parametrize("overwrite", [False, True])
def test_save_refuses_to_replace_a_folder_that_is_not_a_kiln_artifact(models, tmp_path, overwrite):
    folder = users_folder(tmp_path)
    before = snapshot(folder)
    with pytest.raises(kiln.ArtifactError) as info:
        models[0].save(folder, overwrite=overwrite)
    assert str(folder) in str(info.value) and "not a kiln artifact" in str(info.value)
    assert snapshot(folder) == before


@pytest.mark.parametrize("content", [b"my own file", b"PK\x05\x06" + bytes(18)])  # plain bytes; an empty zip
@pytest.mark.parametrize("overwrite", [False, True])
def test_save_refuses_to_replace_a_file_that_is_not_a_kiln_artifact(models, tmp_path, content, overwrite):
    target = tmp_path / "model.kiln"
    target.write_bytes(content)
    with pytest.raises(kiln.ArtifactError, match="not a kiln artifact") as info:
        models[0].save(target, overwrite=overwrite)
    assert str(target) in str(info.value)
    assert target.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.kiln"]


def test_save_refuses_a_zip_whose_manifest_is_another_tools(models, tmp_path):
    target = tmp_path / "other.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("manifest.json", '{"name": "some other tool"}')
    with pytest.raises(kiln.ArtifactError, match="not a kiln artifact"):
        models[0].save(target, overwrite=True)
    assert zipfile.ZipFile(target).namelist() == ["manifest.json"]


def test_save_refuses_a_directory_artifact_that_also_holds_a_users_file(models, tmp_path):
    target = models[0].save(str(tmp_path / "art") + "/")
    (target / "notes.txt").write_text("mine")
    before = snapshot(target)
    with pytest.raises(kiln.ArtifactError, match="notes.txt"):
        models[1].save(target, overwrite=True)
    assert snapshot(target) == before


# ---------------------------------------------------------------- an artifact is replaced only when asked

@pytest.mark.parametrize("kind", ["zip", "directory"])
def test_save_refuses_an_existing_artifact_without_overwrite_and_names_the_fix(models, tmp_path, kind):
    target = models[0].save(tmp_path / "m.kiln" if kind == "zip" else str(tmp_path / "m") + "/")
    before = snapshot(tmp_path)
    with pytest.raises(kiln.ArtifactError) as info:
        models[1].save(target)
    assert str(target) in str(info.value) and "overwrite=True" in str(info.value)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["zip", "directory"])
def test_save_with_overwrite_replaces_an_artifact_and_the_new_one_loads(models, tmp_path, kind):
    old, new = models
    target = old.save(tmp_path / "m.kiln" if kind == "zip" else str(tmp_path / "m") + "/")
    assert new.save(target, overwrite=True) == target
    assert torch.equal(kiln.load(target)(X), new(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no staging or old copy left beside it


def test_save_to_an_empty_directory_fills_it_without_overwrite(models, tmp_path):
    (tmp_path / "empty").mkdir()
    models[0].save(tmp_path / "empty")
    assert torch.equal(kiln.load(tmp_path / "empty")(X), models[0](X))


# ---------------------------------------------------------------- a failed save leaves the old artifact

@pytest.mark.parametrize("kind", ["zip", "directory"])
def test_an_engine_whose_save_fails_halfway_leaves_the_old_artifact_loadable_and_no_temporary_files(models, tmp_path, monkeypatch, kind):
    old, new = models
    out = tmp_path / "out"
    target = old.save(out / "m.kiln" if kind == "zip" else str(out / "m") + "/")
    before = snapshot(out)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def save_halfway(self, directory, stem):
        (Path(directory) / f"{stem}.onnx").write_bytes(b"half an engine")
        raise RuntimeError("disk vanished mid-write")

    monkeypatch.setattr(type(new.engines["p0"]), "save", save_halfway)
    with pytest.raises(RuntimeError, match="disk vanished"):
        new.save(target, overwrite=True)
    monkeypatch.undo()
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == [target.name]
    assert list(scratch.iterdir()) == []
    assert torch.equal(kiln.load(target)(X), old(X))


def test_a_failure_while_swapping_a_directory_in_puts_the_old_artifact_back(models, tmp_path, monkeypatch):
    # Where renameat2 is unavailable the old artifact is moved aside first; if the new one then
    # cannot be renamed in, the old one must come back.
    old, new = models
    target = old.save(str(tmp_path / "m") + "/")
    monkeypatch.setattr(save_module, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(kiln.ArtifactError, match="No space left"):
        new.save(target, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert torch.equal(kiln.load(target)(X), old(X))


def test_without_renameat2_a_directory_artifact_is_still_replaced(models, tmp_path, monkeypatch):
    old, new = models
    target = old.save(str(tmp_path / "m") + "/")
    monkeypatch.setattr(save_module, "_exchange", lambda a, b: False)
    new.save(target, overwrite=True)
    assert torch.equal(kiln.load(target)(X), new(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_rename_exchange_swaps_two_directories_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "from_a").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "from_b").write_text("b")
    if not save_module._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is unavailable here; the fallback is tested above")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["from_b"]
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"]
