"""MiniLM (real weights) served with its sequence length padded: sentences of different lengths
share one engine call, and each embedding equals the one the artifact gives the sentence alone,
unpadded."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.serving.batching import Batcher
from kiln.verify import TOLERANCE

FP32 = TOLERANCE[kiln.Precision.FP32]


@pytest.mark.slow
def test_minilm_sentences_of_different_lengths_share_a_call_and_keep_their_own_embeddings(minilm_sentences):
    path, requests = minilm_sentences
    compiled = kiln.load(path)
    batcher = Batcher(compiled, max_rows=16, pad={"seq": "attention_mask"})
    assert batcher.cut_axes == {}  # one pooled vector per sentence: nothing to cut back
    calls = []
    original = compiled.run_flat
    compiled.run_flat = lambda tensors: calls.append(tuple(tensors[0].shape)) or original(tensors)
    results = batcher(requests)
    longest = max(ids.shape[1] for ids, _ in requests)
    assert calls == [(len(requests), longest)] and len({ids.shape[1] for ids, _ in requests}) == len(requests)
    compiled.run_flat = original
    for (ids, mask), result in zip(requests, results):
        torch.testing.assert_close(result[0], compiled(ids, mask), rtol=FP32.rtol, atol=FP32.atol)
