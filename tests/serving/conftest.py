"""Artifacts shared by the serving tests, compiled once per session."""

from __future__ import annotations

import pytest

import kiln

from serving import serving_models


@pytest.fixture(scope="session")
def ort_artifact(tmp_path_factory):
    return serving_models.compile_masked(tmp_path_factory.mktemp("serving") / "masked_ort.kiln", "onnxruntime")


@pytest.fixture(scope="session")
def openvino_artifact(tmp_path_factory):
    return serving_models.compile_masked(tmp_path_factory.mktemp("serving") / "masked_ov.kiln", "openvino")


@pytest.fixture(scope="session")
def minilm_sentences(tmp_path_factory):
    """MiniLM sentence embeddings (real weights) compiled for ONNX Runtime at fp32 with a dynamic
    batch and length, and sentences of four lengths, each tokenized at its own length."""
    models = pytest.importorskip("kiln.examples.models")
    try:
        encoder, _ = models.minilm()
        tokens = [models.sentence_tokens([s], seq=128) for s in serving_models.SENTENCES]
    except models.MissingExample as exc:
        pytest.skip(str(exc))
    requests = [(ids[:, :int(mask.sum())], mask[:, :int(mask.sum())]) for ids, mask in tokens]
    dims = {0: kiln.Dim("batch", min=1, max=16), 1: kiln.Dim("seq", min=1, max=64)}
    compiled = kiln.optimize(serving_models.SentenceEmbedding(encoder).eval(), "cpu-x86", requests[1], backend="onnxruntime",
                             precision="fp32", dynamic={"input_ids": dims, "attention_mask": dims})
    path = compiled.save(tmp_path_factory.mktemp("minilm") / "minilm.kiln")
    return path, requests
