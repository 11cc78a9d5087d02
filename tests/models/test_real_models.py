"""Real trained models, end to end on cpu-x86: capture -> optimize -> verify -> save ->
load in a fresh process without the model's source -> same outputs as eager."""

import pytest
import torch

import kiln
from kiln.backends.openvino import OpenVinoBackend
from kiln.examples import models

from e2e_support import assert_fp32_close, eager_leaves, run_in_fresh_process
from kiln.verify import TOLERANCE
from kiln.types import Precision

FP32 = TOLERANCE[Precision.FP32]  # compiled fp32 engines against eager

pytestmark = pytest.mark.slow

_openvino = OpenVinoBackend().available()
BACKENDS = ["onnxruntime", "inductor",
            pytest.param("openvino", marks=pytest.mark.skipif(not _openvino.ok, reason=_openvino.reason))]

SENTENCES = [
    "The kiln fires the clay at a steady heat.",
    "A compiled model should give the same answers as the original.",
    "Rain is expected across the north by the evening.",
    "She tuned the old piano before the concert began.",
]


@pytest.fixture(scope="module")
def minilm():
    model, _ = models.minilm()
    ids, mask = models.sentence_tokens(SENTENCES, seq=64)
    return model, (ids, mask)


@pytest.fixture(scope="module")
def efficientnet():
    model, _ = models.efficientnet_lite0(batch=2)
    torch.manual_seed(1)
    return model, (torch.rand(2, 3, 224, 224) * 2 - 1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_minilm_matches_eager_after_reload_in_a_fresh_process(minilm, backend, tmp_path):
    model, inputs = minilm
    compiled = kiln.optimize(model, "cpu-x86", inputs, backend=backend, precision="fp32")
    assert compiled.backends == {"p0": backend}
    assert all(check["ok"] for check in compiled.report.verification)
    want = eager_leaves(model, inputs)
    out = compiled(*inputs)
    assert_fp32_close([out.last_hidden_state, out.pooler_output], want)
    artifact = compiled.save(tmp_path / "minilm.kiln")
    assert_fp32_close(run_in_fresh_process(artifact, inputs, tmp_path), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_efficientnet_lite0_matches_eager_after_reload_in_a_fresh_process(efficientnet, backend, tmp_path):
    model, inputs = efficientnet
    compiled = kiln.optimize(model, "cpu-x86", inputs, backend=backend, precision="fp32")
    folded = next(p for p in compiled.report.passes if p.name == "fold_batchnorm")
    assert folded.counts["folded"] == 49  # every BatchNorm of the network sits after a conv
    want = eager_leaves(model, inputs)
    assert_fp32_close([compiled(*inputs)], want)
    artifact = compiled.save(tmp_path / "effnet.kiln")
    assert_fp32_close(run_in_fresh_process(artifact, inputs, tmp_path), want)


def test_minilm_sentence_embeddings_keep_their_similarities(minilm):
    model, inputs = minilm
    compiled = kiln.optimize(model, "cpu-x86", inputs, backend="onnxruntime", precision="fp32")

    def embed(fn):
        hidden = fn(*inputs)["last_hidden_state"]
        mask = inputs[1].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    with torch.no_grad():
        ref, got = embed(model), embed(compiled)
    cosine = (ref * got).sum(-1)
    assert float(cosine.min()) > 0.99999
    torch.testing.assert_close(got @ got.T, ref @ ref.T, rtol=FP32.rtol, atol=FP32.atol)


def test_minilm_with_dynamic_batch_and_sequence_runs_other_sizes(minilm):
    model, inputs = minilm
    dims = {0: kiln.Dim("batch", 1, 16), 1: kiln.Dim("seq", 8, 128)}
    compiled = kiln.optimize(model, "cpu-x86", inputs, backend="onnxruntime", precision="fp32",
                             dynamic={"input_ids": dims, "attention_mask": dims})
    ids, mask = models.sentence_tokens(SENTENCES[:3], seq=40)
    assert_fp32_close(list(compiled(ids, mask).values()), eager_leaves(model, (ids, mask)))
    with pytest.raises(kiln.InputMismatch, match="seq"):
        compiled(*models.sentence_tokens(SENTENCES[:1], seq=200))


def test_cpu_x86_measures_every_backend_and_keeps_the_fastest_verified_one(efficientnet):
    model, inputs = efficientnet
    compiled = kiln.optimize(model, "cpu-x86", inputs, precision="fp32")
    statuses = {c.backend: c.status for c in compiled.report.candidates}
    timed = [c for c in compiled.report.candidates if c.median_ms is not None]
    openvino_here = statuses["openvino"] != "unavailable"  # built, verified and timed wherever it is installed
    assert {c.backend for c in timed} == {"onnxruntime", "inductor", *(("openvino",) if openvino_here else ())}
    chosen = next(c for c in timed if c.status == "chosen")
    assert chosen.median_ms == min(c.median_ms for c in timed)
    assert compiled.backends["p0"] == chosen.backend
