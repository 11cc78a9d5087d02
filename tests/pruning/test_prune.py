"""kiln.prune: structured pruning by magnitude into smaller dense layers.

Tiny models from tests/pruning/prunable_models.py (a BERT from a transformers config, a stack of
EfficientNet-style MBConv blocks), one check on the real MiniLM. Numerics against the eager
model at fp32 tolerance where pruning must not change the function (level 0, zero-norm units)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kiln
from kiln.cli import main
from kiln.verify import TOLERANCE
from pruning.prunable_models import tiny_bert, tiny_convnet

FP32 = dict(rtol=TOLERANCE[kiln.Precision.FP32].rtol, atol=TOLERANCE[kiln.Precision.FP32].atol)


def _hidden(model, inputs):
    with torch.no_grad():
        out = model(*inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _zero_heads_and_neurons(model, head: int, neurons: slice) -> None:
    """Make one head and a slice of FFN neurons in every layer own only zeros: they contribute nothing."""
    with torch.no_grad():
        for layer in model.encoder.layer:
            attn = layer.attention.self
            rows = slice(head * attn.attention_head_size, (head + 1) * attn.attention_head_size)
            for lin in (attn.query, attn.key, attn.value):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            layer.attention.output.dense.weight[:, rows] = 0
            layer.intermediate.dense.weight[neurons] = 0
            layer.intermediate.dense.bias[neurons] = 0  # GELU(0) = 0
            layer.output.dense.weight[:, neurons] = 0


def test_pruned_bert_is_smaller_and_dense():
    model, inputs = tiny_bert()
    pruned = kiln.prune(model, inputs, 0.5)
    assert pruned.parameters_after < pruned.parameters_before == sum(p.numel() for p in model.parameters())
    assert pruned.parameters_after == sum(p.numel() for p in pruned.model.parameters())
    assert pruned.removed == {"heads": 4, "neurons": 64}  # 2 of 4 heads and 32 of 64 neurons in each of 2 layers
    layer = pruned.model.encoder.layer[0]
    # Dense: the layers themselves shrank, nothing is masked.
    assert layer.attention.self.query.weight.shape == (16, 32)
    assert layer.attention.self.num_attention_heads == 2
    assert layer.attention.output.dense.weight.shape == (32, 16)
    assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
    linears = [m for m in pruned.model.modules() if isinstance(m, nn.Linear)]
    assert all(bool((m.weight.abs().sum(0) > 0).all() and (m.weight.abs().sum(1) > 0).all()) for m in linears)
    assert pruned.fraction_removed == pytest.approx(0.5)
    assert ("encoder.layer.1", "neurons", 32, 64) in pruned.per_layer
    assert _hidden(pruned.model, inputs).shape == _hidden(model, inputs).shape
    assert "removed 4 heads, 64 neurons" in pruned.describe()


def test_level_zero_keeps_outputs_exactly():
    for build in (tiny_bert, tiny_convnet):
        model, inputs = build()
        pruned = kiln.prune(model, inputs, 0.0)
        assert pruned.parameters_after == pruned.parameters_before and sum(pruned.removed.values()) == 0
        assert torch.equal(_hidden(pruned.model, inputs), _hidden(model, inputs))


def test_zero_norm_heads_and_neurons_are_removed_first_and_outputs_match():
    model, inputs = tiny_bert()
    _zero_heads_and_neurons(model, head=1, neurons=slice(8, 24))
    pruned = kiln.prune(model, inputs, 0.25)  # one head of four and 16 neurons of 64 per layer
    assert pruned.removed == {"heads": 2, "neurons": 32}
    torch.testing.assert_close(_hidden(pruned.model, inputs), _hidden(model, inputs), **FP32)
    # The survivors are the original nonzero units, in their order.
    kept = pruned.model.encoder.layer[0].attention.self.query.weight
    original = model.encoder.layer[0].attention.self.query.weight
    assert torch.equal(kept, torch.cat([original[:8], original[16:]]))


def test_zero_norm_conv_channels_are_removed_first_and_outputs_match():
    model, inputs = tiny_convnet()
    with torch.no_grad():
        for block in model.blocks:
            width = block._bn0.num_features
            gone = slice(0, width // 4)
            block._expand_conv.weight[gone] = 0
            for bn in (block._bn0, block._bn1):
                bn.weight[gone] = 0
                bn.bias[gone] = 0
            block._depthwise_conv.weight[gone] = 0
            block._project_conv.weight[:, gone] = 0
    pruned = kiln.prune(model, inputs, 0.25, parts=("channels",))
    assert [row[2:] for row in pruned.per_layer] == [(24, 32), (36, 48), (36, 48)]
    block = pruned.model.blocks[1]
    assert block._depthwise_conv.weight.shape == (36, 1, 5, 5) and block._depthwise_conv.groups == 36
    assert block._bn1.running_mean.shape == (36,) and block._project_conv.weight.shape == (12, 36, 1, 1)
    torch.testing.assert_close(_hidden(pruned.model, inputs), _hidden(model, inputs), **FP32)


def test_channels_read_by_squeeze_excitation_are_left_alone_with_a_reason():
    model, inputs = tiny_convnet(se_in_last=True)
    pruned = kiln.prune(model, inputs, 0.5)
    assert [row[0] for row in pruned.per_layer] == ["blocks.0", "blocks.1"]
    assert pruned.skipped and pruned.skipped[0][0] == "blocks.2" and "squeeze-and-excitation" in pruned.skipped[0][1]
    assert pruned.model.blocks[2]._expand_conv.out_channels == 48


def test_users_model_is_untouched():
    model, inputs = tiny_bert()
    state = copy.deepcopy(model.state_dict())
    before = _hidden(model, inputs)
    kiln.prune(model, inputs, 0.7)
    assert model.encoder.layer[0].attention.self.num_attention_heads == 4
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_hidden(model, inputs), before)


def test_pruning_keeps_one_unit_per_layer_at_high_levels():
    model, inputs = tiny_bert()
    pruned = kiln.prune(model, inputs, 0.99)
    assert min(row[2] for row in pruned.per_layer) == 1
    assert torch.isfinite(_hidden(pruned.model, inputs)).all()


@pytest.mark.parametrize("level", [1.0, -0.1, "0.3", True, float("nan")])
def test_level_outside_zero_to_one_is_an_options_error(level):
    model, inputs = tiny_bert(layers=1)
    with pytest.raises(kiln.OptionsError, match="prune level"):
        kiln.prune(model, inputs, level)


def test_unknown_part_and_unordered_levels_are_options_errors():
    model, inputs = tiny_bert(layers=1)
    with pytest.raises(kiln.OptionsError, match="choose from heads, neurons, channels"):
        kiln.prune(model, inputs, 0.3, parts=("filters",))
    with pytest.raises(kiln.OptionsError, match="not increasing"):
        kiln.prune_levels(model, inputs, [0.5, 0.1])


def test_a_model_without_prunable_structure_names_what_kiln_looks_for():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(kiln.NothingToPrune, match="query/key/value.*intermediate.dense") as err:
        kiln.prune(model, (torch.randn(1, 4),), 0.3, parts=("heads", "neurons"))
    assert err.value.fix


def test_prune_levels_progressive_calls_fine_tune_between_levels():
    model, inputs = tiny_bert()
    widths = []

    def fine_tune(m):  # records what it was given, and changes the weights so later levels see it
        widths.append(m.encoder.layer[0].intermediate.dense.out_features)
        with torch.no_grad():
            m.encoder.layer[0].intermediate.dense.weight.mul_(1.01)

    results = kiln.prune_levels(model, inputs, [0.1, 0.3, 0.5], fine_tune=fine_tune)
    assert widths == [58, 45, 32]
    assert [r.parameters_after for r in results] == sorted((r.parameters_after for r in results), reverse=True)
    # Without fine-tuning, progressive and one-shot pruning agree.
    progressive = kiln.prune_levels(model, inputs, [0.1, 0.5])[-1]
    torch.testing.assert_close(_hidden(progressive.model, inputs), _hidden(kiln.prune(model, inputs, 0.5).model, inputs),
                               rtol=0, atol=0)


def test_optimize_compiles_and_verifies_the_pruned_model(tmp_path):
    model, inputs = tiny_bert()
    pruned = kiln.prune(model, inputs, 0.5)
    compiled = kiln.optimize(pruned.model, "cpu-x86", inputs, precision="fp32", backend="onnxruntime", effort="fast",
                             cache=False)
    assert compiled.report.verification
    torch.testing.assert_close(_hidden(compiled, inputs), _hidden(pruned.model, inputs), **FP32)


def test_cli_prune_writes_a_program_that_compile_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent))  # also undoes the cwd kiln.cli puts on sys.path
    out = tmp_path / "pruned.pt2"
    assert main(["prune", "pruning.prunable_models:tiny_convnet", "--level", "0.5", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["removed"] == {"channels": 64} and summary["parameters_after"] < summary["parameters_before"]
    program = torch.export.load(out)
    model, inputs = tiny_convnet()
    expected = _hidden(kiln.prune(model, inputs, 0.5).model, inputs)
    torch.testing.assert_close(program.module()(*inputs), expected, **FP32)
    assert main(["prune", "pruning.prunable_models:tiny_convnet", "--level", "0.5", "-o", str(out)]) == 2  # exists
    artifact = tmp_path / "pruned.kiln"
    assert main(["compile", str(out), "--precision", "fp32", "--backend", "onnxruntime", "--effort", "fast",
                 "-o", str(artifact), "--quiet", "--json"]) == 0
    capsys.readouterr()
    torch.testing.assert_close(kiln.load(artifact)(*inputs), expected, **FP32)


def test_real_minilm_pruned_heads_and_neurons_shrink_and_run():
    models = pytest.importorskip("kiln.examples.models")
    try:
        model, inputs = models.minilm(seq=16)
    except models.MissingExample as exc:
        pytest.skip(str(exc))
    pruned = kiln.prune(model, inputs, 0.3)
    assert pruned.removed == {"heads": 24, "neurons": 2766}  # per layer of six: 4 of 12 heads, 461 of 1536 neurons
    assert pruned.model.encoder.layer[5].attention.self.query.out_features == 8 * 32
    assert torch.isfinite(_hidden(pruned.model, inputs)).all()
