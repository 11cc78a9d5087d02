"""The whole pass pipeline on small real architectures: fewer nodes, the same outputs."""

import pytest
import torch

from kiln.passes import pipeline
from kiln.types import Dim, Precision
from kiln.verify import TOLERANCE

transformers = pytest.importorskip("transformers")

CLEANUP = {"remove_noop_views", "remove_redundant_permutes", "eliminate_common_subexpressions"}


def _bert(attn: str):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    return transformers.BertModel(config).eval()


def _gpt2(attn: str):
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     attn_implementation=attn, use_cache=False)
    return transformers.GPT2Model(config).eval()


def _tokens(batch: int = 2, seq: int = 8) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.int64)}


def _run_pipeline(run) -> dict[str, dict]:
    before = len(run.gm.graph.nodes)
    records = pipeline.run(run.gm, run.ctx).records
    assert len(run.gm.graph.nodes) < before
    run.assert_same_numerics()
    totals: dict[str, dict] = {}
    for record in records:
        for key, value in record.counts.items():
            totals.setdefault(record.name, {}).setdefault(key, 0)
            totals[record.name][key] += value
    return totals


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cleanup_shrinks_transformers_and_keeps_their_outputs(run_pass, make, attn):
    run = run_pass(make(attn), _tokens())
    totals = _run_pipeline(run)
    assert totals["remove_noop_views"]["removed"] > 0  # view(-1, seq, hidden) on that very shape, to(same dtype)
    assert totals["eliminate_common_subexpressions"]["merged"] > 0  # repeated arange / mask building


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_cleanup_keeps_a_dynamic_batch_and_sequence_working(run_pass, make):
    seq = Dim("seq", 2, 64)
    run = run_pass(make("sdpa"), _tokens(), dynamic={"input_ids": {0: "batch", 1: seq},
                                                      "attention_mask": {0: "batch", 1: seq}})
    _run_pipeline(run)
    inputs = _tokens(batch=3, seq=11)
    reference = run.reference(inputs["input_ids"], inputs["attention_mask"])
    for got, want in zip(run.gm(inputs["input_ids"], inputs["attention_mask"]), reference):
        torch.testing.assert_close(got, want, rtol=TOLERANCE[Precision.FP32].rtol, atol=TOLERANCE[Precision.FP32].atol)


def test_cleanup_on_efficientnet_lite0_keeps_its_outputs(run_pass):
    models = pytest.importorskip("kiln.examples.models")
    try:
        model, inputs = models.efficientnet_lite0(batch=1, size=64)
    except models.MissingExample as exc:
        pytest.skip(str(exc))
    run = run_pass(model, inputs)
    totals = _run_pipeline(run)
    assert totals["fold_batchnorm"]["folded"] == 49
    # a convolution stack holds no views, permutes or repeats: the cleanup passes find nothing
    assert all(not any(totals.get(name, {}).values()) for name in CLEANUP)
