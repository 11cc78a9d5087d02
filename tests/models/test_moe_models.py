"""A mixture-of-experts model from a transformers config: optimize -> verify -> save -> load in
a fresh process without transformers -> same outputs; the model as it was afterwards."""

from __future__ import annotations

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import kiln
from e2e_support import assert_fp32_close, eager_leaves, run_in_fresh_process


def test_tiny_mixtral_compiles_verifies_and_reloads_without_transformers(tmp_path):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64)  # use_cache left on: kiln captures without it
    model = MixtralForCausalLM(config).eval()
    model.set_experts_implementation("eager")  # transformers' loop, which torch.export alone refuses
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    want = eager_leaves(model, (ids,))[:1]  # the logits (eager also returns its cache)

    compiled = kiln.optimize(model, "cpu-x86", ids, backend="onnxruntime", precision="fp32", cache=False)

    assert all(check["ok"] for check in compiled.report.verification)
    assert [b["form"] for b in compiled.report.experts] == ["blocked", "blocked"]
    assert all(sum(b["load"]) == 2 * 12 * 2 for b in compiled.report.experts)  # tokens x top_k, per layer
    assert "Mixture of experts" in compiled.report.render()
    assert_fp32_close([compiled(ids)["logits"]], want)
    assert model.config.use_cache and model.config._experts_implementation == "eager"
    assert all("forward" not in m.__dict__ for m in model.modules())
    artifact = compiled.save(tmp_path / "mixtral.kiln")
    assert kiln.load(artifact).report.experts == compiled.report.experts
    assert_fp32_close(run_in_fresh_process(artifact, (ids,), tmp_path), want)
