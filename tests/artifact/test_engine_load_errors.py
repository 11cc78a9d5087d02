"""Whatever a runtime raises while loading an engine reaches the caller as an ArtifactError that
names the partition, the backend and the original error (its type and first line), with the
original chained as its cause; only interrupts, exits and MemoryError pass through as they are."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import kiln
from artifact.small_model import Net
from kiln.backends.onnxruntime import OnnxRuntimeBackend


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    compiled = kiln.optimize(Net().eval(), "cpu-x86", (torch.randn(2, 8),), backend="onnxruntime")
    return compiled.save(tmp_path_factory.mktemp("errors") / "a.kiln")


def load_raising(monkeypatch, error: BaseException):
    def load(self, directory, entry, settings):
        raise error

    monkeypatch.setattr(OnnxRuntimeBackend, "load", load)


@pytest.mark.parametrize("error", [AssertionError("tensor_meta cannot be None\nsecond line of detail"),
                                   NotImplementedError("no kernel registered for this op"),
                                   ValueError("protobuf parse failed")])
def test_an_engine_whose_runtime_raises_while_loading_is_refused_with_an_artifact_error(artifact, monkeypatch, tmp_path, error):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    load_raising(monkeypatch, error)
    with pytest.raises(kiln.ArtifactError) as info:
        kiln.load(artifact)
    message = str(info.value)
    for word in ("'p0'", "onnxruntime", type(error).__name__, str(error).splitlines()[0], str(artifact)):
        assert word in message, f"{word!r} not in {message!r}"
    assert "second line" not in message
    assert info.value.__cause__ is error
    assert list(scratch.iterdir()) == []  # the extracted engine files are removed


@pytest.mark.parametrize("error", [KeyboardInterrupt(), MemoryError(), SystemExit(3)])
def test_interrupts_exits_and_memory_errors_while_loading_an_engine_propagate_unchanged(artifact, monkeypatch, error):
    load_raising(monkeypatch, error)
    with pytest.raises(type(error)) as info:
        kiln.load(artifact)
    assert info.value is error
