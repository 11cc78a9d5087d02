"""Where a saved engine's files come from: links inside a build's own folder, copies elsewhere."""

from kiln.backends.base import place_engine_file


def test_an_engine_saved_inside_its_build_folder_links_its_files(tmp_path):
    # an isolated build hands its engine to the parent through a folder inside its own
    built = tmp_path / "p0.onnx.data"
    built.write_bytes(b"weights" * 1000)
    handoff = tmp_path / "engine"
    handoff.mkdir()
    place_engine_file(built, handoff / built.name)
    assert (handoff / built.name).stat().st_ino == built.stat().st_ino


def test_an_engine_saved_anywhere_else_gets_its_own_copy(tmp_path):
    build, artifact = tmp_path / "build", tmp_path / "artifact"
    build.mkdir()
    artifact.mkdir()
    built = build / "p0.bin"
    built.write_bytes(b"weights" * 1000)
    place_engine_file(built, artifact / "p0.bin")
    saved = artifact / "p0.bin"
    assert saved.read_bytes() == built.read_bytes() and saved.stat().st_ino != built.stat().st_ino
    saved.write_bytes(b"changed")  # the artifact's file is its own: the build keeps its bytes
    assert built.read_bytes() == b"weights" * 1000
