"""Recognition passes on tiny transformers models built from configs (random weights): every
layer's hand-written norm, activation and Conv1D is found, and the graph still computes the same."""

import pytest
import torch

from kiln.passes import pipeline

transformers = pytest.importorskip("transformers")
LAYERS = 3


def _run(run_pass, model):
    torch.manual_seed(0)
    run = run_pass(model.eval(), (torch.randint(0, 64, (2, 8)),))
    counts = {r.name: r.counts for r in pipeline.run(run.gm, run.ctx).records}
    run.assert_same_numerics()
    return run, counts


def test_llama_rms_norms_are_all_recognised(run_pass):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False)
    run, counts = _run(run_pass, transformers.LlamaModel(config))
    # two per decoder layer (before attention, before the MLP) and the final norm
    assert counts["recognise_norms"] == {"layer_norm": 0, "rms_norm": 2 * LAYERS + 1}
    assert run.ops().count(torch.ops.aten.rms_norm.default) == 2 * LAYERS + 1
    assert torch.ops.aten.rsqrt.default not in run.ops()


def test_t5_rms_norms_and_gated_tanh_gelus_are_all_recognised(run_pass):
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS, num_heads=2,
                                   feed_forward_proj="gated-gelu", use_cache=False)
    run, counts = _run(run_pass, transformers.T5EncoderModel(config))
    assert counts["recognise_norms"]["rms_norm"] == 2 * LAYERS + 1
    assert counts["recognise_activations"]["gelu_tanh"] == LAYERS  # T5 v1.1 uses gelu_new
    assert torch.ops.aten.tanh.default not in run.ops()


def test_gpt2_conv1d_layers_become_linear_with_their_tanh_gelu_epilogue(run_pass):
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=64,
                                     use_cache=False)
    run, counts = _run(run_pass, transformers.GPT2Model(config))
    # c_attn, attention c_proj, c_fc and MLP c_proj in every block
    assert counts["fuse_linear_bias"] == {"linear": 4 * LAYERS, "with_bias": 4 * LAYERS}
    assert counts["recognise_activations"]["gelu_tanh"] == LAYERS
    assert counts["group_epilogues"]["linear_gelu_tanh"] == LAYERS
    assert torch.ops.aten.addmm.default not in run.ops()
