"""Artifacts shared by the serving tests, compiled once per session."""

from __future__ import annotations

import pytest

from serving import serving_models


@pytest.fixture(scope="session")
def ort_artifact(tmp_path_factory):
    return serving_models.compile_masked(tmp_path_factory.mktemp("serving") / "masked_ort.kiln", "onnxruntime")


@pytest.fixture(scope="session")
def openvino_artifact(tmp_path_factory):
    return serving_models.compile_masked(tmp_path_factory.mktemp("serving") / "masked_ov.kiln", "openvino")
