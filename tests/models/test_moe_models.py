"""A mixture-of-experts model from a transformers config: optimize -> verify -> save -> load in
a fresh process without transformers -> same outputs; the model as it was afterwards."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import kiln
from e2e_support import assert_fp32_close, eager_leaves, run_in_fresh_process


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)  # use_cache left on: kiln captures without it
    model = MixtralForCausalLM(config).eval()
    model.set_experts_implementation("eager")  # transformers' loop, which torch.export alone refuses
    return model


def test_tiny_mixtral_compiles_verifies_and_reloads_without_transformers(tmp_path):
    model = tiny_mixtral()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    want = eager_leaves(model, (ids,))[:1]  # the logits (eager also returns its cache)

    compiled = kiln.optimize(model, "cpu-x86", ids, backend="onnxruntime", precision="fp32", cache=False)

    assert all(check["ok"] for check in compiled.report.verification)
    assert [b["form"] for b in compiled.report.experts] == ["dispatch", "dispatch"]
    assert [p.backend for p in compiled.report.partitions] == ["onnxruntime", "eager", "onnxruntime", "eager", "onnxruntime"]
    assert all(sum(b["load"]) == 2 * 12 * 2 for b in compiled.report.experts)  # tokens x top_k, per layer
    assert "Mixture of experts" in compiled.report.render()
    assert_fp32_close([compiled(ids)["logits"]], want)
    assert model.config.use_cache and model.config._experts_implementation == "eager"
    assert all("forward" not in m.__dict__ for m in model.modules())
    artifact = compiled.save(tmp_path / "mixtral.kiln")
    assert kiln.load(artifact).report.experts == compiled.report.experts
    assert_fp32_close(run_in_fresh_process(artifact, (ids,), tmp_path), want)


def test_experts_the_plan_lowers_run_in_the_eager_partition_with_bf16_weights(tmp_path):
    model = tiny_mixtral()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    want = eager_leaves(model, (ids,))[0]

    with pytest.warns(kiln.UnprovenAccuracyWarning):  # no calibration data: measured on the example inputs only
        compiled = kiln.optimize(model, "cpu-x86", ids, backend="openvino", precision="bf16", cache=False,
                                 accuracy_budget=kiln.Budget(min_cosine=0.999))

    experts = [row for row in compiled.report.precision if row["op"] == "experts"]
    assert [row["scheme"] for row in experts] == ["bf16", "bf16"], [row["reason"] for row in experts]
    eager = [compiled.engines[p.name] for p in compiled.plan.partitions if p.backend == "eager"]
    assert len(eager) == 2
    for engine in eager:  # the experts' weights stored in bf16, not cast per call
        (node,) = [n for n in engine.module.graph.nodes if str(n.target) == "kiln.moe_experts.default"]
        assert {engine.module.get_buffer(a.target).dtype for a in node.args[3:5]} == {torch.bfloat16}
    got = compiled(ids)["logits"]
    cosine = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0)
    assert 0.999 <= cosine < 1.0
    artifact = compiled.save(tmp_path / "mixtral-bf16.kiln")
    (reloaded,) = run_in_fresh_process(artifact, (ids,), tmp_path)[:1]
    torch.testing.assert_close(reloaded, got, rtol=1e-5, atol=1e-5)
