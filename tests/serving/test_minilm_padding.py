"""MiniLM (real weights) served with its sequence length padded: sentences of different lengths
share one engine call, and each embedding equals the one the artifact gives the sentence alone,
unpadded."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln.serving.batching import Batcher
from kiln.verify import TOLERANCE
from serving.serving_models import SentenceEmbedding

FP32 = TOLERANCE[kiln.Precision.FP32]
SENTENCES = ["A cat sat.", "The weather turned cold overnight, and the river froze at its edges.",
             "Compilers make models fast.", "Batching requests keeps the cores busy while each waits a little."]


@pytest.mark.slow
def test_minilm_sentences_of_different_lengths_share_a_call_and_keep_their_own_embeddings(tmp_path):
    models = pytest.importorskip("kiln.examples.models")
    try:
        encoder, _ = models.minilm()
        tokens = [models.sentence_tokens([s], seq=128) for s in SENTENCES]
    except models.MissingExample as exc:
        pytest.skip(str(exc))
    # each sentence at its own length: no padding in the requests themselves
    requests = [(ids[:, :int(mask.sum())], mask[:, :int(mask.sum())]) for ids, mask in tokens]
    dims = {0: kiln.Dim("batch", min=1, max=16), 1: kiln.Dim("seq", min=1, max=64)}
    compiled = kiln.optimize(SentenceEmbedding(encoder).eval(), "cpu-x86", requests[1], backend="onnxruntime",
                             precision="fp32", dynamic={"input_ids": dims, "attention_mask": dims})
    batcher = Batcher(compiled, max_rows=16, pad={"seq": "attention_mask"})
    assert batcher.cut_axes == {}  # one pooled vector per sentence: nothing to cut back
    calls = []
    original = compiled.run_flat
    compiled.run_flat = lambda tensors: calls.append(tuple(tensors[0].shape)) or original(tensors)
    results = batcher(requests)
    longest = max(ids.shape[1] for ids, _ in requests)
    assert calls == [(len(SENTENCES), longest)] and len({ids.shape[1] for ids, _ in requests}) == len(SENTENCES)
    compiled.run_flat = original
    for (ids, mask), result in zip(requests, results):
        torch.testing.assert_close(result[0], compiled(ids, mask), rtol=FP32.rtol, atol=FP32.atol)
