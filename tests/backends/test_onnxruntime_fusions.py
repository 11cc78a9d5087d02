"""What ONNX Runtime really fuses once kiln's passes have run: read from the graph ORT itself
optimises (SessionOptions.optimized_model_filepath), not from kiln's own counts."""

import collections

import numpy as np
import pytest
import torch
from torch import nn

import kiln
from kiln.ir import PartitionGraph
from kiln.backends.onnxruntime import OnnxRuntimeBackend
from kiln.frontend.capture import capture
from kiln.hardware_profiles import load
from kiln.options import CompileOptions
from kiln.passes import pipeline
from kiln.passes.context import PassContext
from kiln.types import Precision
from kiln.verify import TOLERANCE

FP32 = TOLERANCE[Precision.FP32]  # compiled fp32 engines against eager

backend = OnnxRuntimeBackend()
if not backend.available().ok:
    pytest.skip(backend.available().reason, allow_module_level=True)

TOL = TOLERANCE[Precision.FP32]


def _compile(model: nn.Module, inputs: tuple, settings):
    captured = capture(model.eval(), inputs)
    ctx = PassContext(load("cpu-x86"), CompileOptions(), captured.input_spec)
    records = pipeline.run(captured.gm, ctx).records
    partition = PartitionGraph("p0", captured.gm, captured.input_spec.names, captured.output_names,
                               captured.example_inputs, None)
    engine = backend.compile(partition, settings)
    for got, want in zip(engine(*captured.example_inputs), captured.example_outputs):
        torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol)
    return engine, {r.name: r.counts for r in records}


def _ort_graph(engine, tmp_path) -> list:
    """The nodes of the graph ONNX Runtime runs after its own optimisations."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(engine.model_path), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=list(engine.disabled_optimizers))
    return list(onnx.load(options.optimized_model_filepath).graph.node)


def _activation(node) -> str | None:
    return next((a.s.decode() for a in node.attribute if a.name == "activation"), None)


class Mlp(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.act = nn.Linear(16, 32), act

    def forward(self, x):
        return self.act(self.fc(x))


def test_ort_fuses_relu_into_the_gemm_of_a_rank3_linear(settings, tmp_path):
    engine, counts = _compile(Mlp(nn.ReLU()), (torch.randn(2, 4, 16),), settings)
    assert counts["group_epilogues"]["linear_relu"] == 1
    nodes = _ort_graph(engine, tmp_path)
    fused = [n for n in nodes if n.op_type == "FusedGemm"]
    assert len(fused) == 1 and _activation(fused[0]) == "Relu"
    assert not any(n.op_type == "Relu" for n in nodes)


def test_ort_fuses_the_bias_add_and_erf_gelu_of_a_linear_into_bias_gelu(settings, tmp_path):
    engine, counts = _compile(Mlp(nn.GELU()), (torch.randn(2, 4, 16),), settings)
    assert counts["group_epilogues"]["linear_gelu"] == 1
    ops = collections.Counter(n.op_type for n in _ort_graph(engine, tmp_path))
    assert ops == {"MatMul": 1, "BiasGelu": 1}


def test_a_fused_graph_that_changes_the_answer_is_rebuilt_from_a_fresh_unfused_export(settings, monkeypatch):
    # the rules rewrite the exported graph in place, so the fallback exports the partition again
    from kiln.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend, "_fusion_changed_answers", lambda engine, partition: "output 'y': max abs error 1")
    engine, _ = _compile(Mlp(nn.GELU()), (torch.randn(2, 4, 16),), settings)
    assert "changed the graph's answer" in engine.summary and "unfused graph used" in engine.summary
    assert "BiasGelu" not in engine.summary


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_ort_runs_conv_batchnorm_relu_as_one_convolution_with_the_activation(settings, tmp_path):
    model = ConvBnRelu().train()
    with torch.no_grad():
        model(torch.randn(4, 8, 10, 10) * 2 + 1)
    engine, counts = _compile(model, (torch.randn(1, 8, 10, 10),), settings)
    assert counts["fold_batchnorm"] == {"folded": 1} and counts["group_epilogues"]["conv_relu"] == 1
    nodes = _ort_graph(engine, tmp_path)
    convs = [n for n in nodes if "Conv" in n.op_type]
    assert len(convs) == 1 and _activation(convs[0]) == "Relu"  # FusedConv, or the NCHWc Conv on AVX-512
    assert not any(n.op_type in ("Relu", "BatchNormalization") for n in nodes)


class LlamaRMSNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


@pytest.mark.parametrize("model", [LlamaRMSNorm(), nn.RMSNorm(8)], ids=["hand_written", "torch_rms_norm"])
def test_ort_runs_rms_norm_as_simplified_layer_normalization(settings, tmp_path, model):
    engine, _ = _compile(model, (torch.randn(2, 4, 8),), settings)
    assert "rms_normalization 1" in engine.summary
    assert [n.op_type for n in _ort_graph(engine, tmp_path)] == ["SimplifiedLayerNormalization"]


def test_tiny_bert_keeps_residual_add_and_layer_norm_unfused_on_the_cpu_provider():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    compiled = kiln.optimize(model, "cpu-x86", (torch.randint(0, 100, (2, 16)),), backend="onnxruntime", cache=False)
    chosen = next(c for c in compiled.report.candidates if c.status == "chosen")
    # two per layer (after attention and after the feed-forward block), all spelled back out
    assert "4 SkipLayerNormalization kept as Add + LayerNormalization" in chosen.detail
    assert "ORT optimizers off on the CPU provider: SkipLayerNormFusion" in chosen.detail
    assert "SkipLayerNormalization" not in chosen.detail.split(";")[0]  # what ORT runs
    assert "bias_gelu 2" in chosen.detail


class ResidualNorm(nn.Module):
    """A post-norm residual block: LayerNorm(x + W·x + b), which onnxscript fuses into SkipLayerNormalization."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc, self.norm = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.fc(x))


def test_cpu_engine_runs_layer_norm_not_skip_layer_norm_and_keeps_that_after_save_and_load(settings, tmp_path):
    torch.manual_seed(0)
    engine, _ = _compile(ResidualNorm(), (torch.randn(2, 4, 16),), settings)
    assert engine.disabled_optimizers == ("SkipLayerNormFusion", "MatMulAddFusion")
    ops = collections.Counter(n.op_type for n in _ort_graph(engine, tmp_path))
    assert ops["LayerNormalization"] == 1 and ops["SkipLayerNormalization"] == 0, ops
    saved = tmp_path / "saved"
    saved.mkdir()
    entry = engine.save(saved, "p0")
    assert entry.meta["disabled_optimizers"] == ["SkipLayerNormFusion", "MatMulAddFusion"]
    reloaded = backend.load(saved, entry, settings)
    assert reloaded.disabled_optimizers == engine.disabled_optimizers
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(reloaded(x)[0], engine(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("cpu", [True, False])
def test_skip_layer_norm_is_spelled_out_only_for_the_cpu_provider(cpu, tmp_path):
    import onnx

    from backends.conftest import make_partition
    from kiln.backends.onnxruntime import _fuse_for_ort, export_onnx

    graph, _ = make_partition(ResidualNorm().eval(), (torch.randn(2, 4, 16),))
    program = export_onnx(graph, tmp_path / "unfused.onnx")
    summary = _fuse_for_ort(program, tmp_path / "fused.onnx", cpu)
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node)
    assert (ops["SkipLayerNormalization"], ops["LayerNormalization"]) == ((0, 1) if cpu else (1, 0)), ops
    assert ("1 SkipLayerNormalization kept as Add + LayerNormalization" in summary) is cpu, summary
    assert ("skip_layer_normalization 1" in summary) is not cpu, summary


def _skip_layer_norm_model(outputs: list[str]):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), name) for name in ("g", "b", "bias")]
    node = helper.make_node("SkipLayerNormalization", ["x", "skip", "g", "b", "bias"], outputs,
                            domain="com.microsoft", epsilon=1e-5, name="sln")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3, 8]) for n in ("x", "skip")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs if n], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])


def _run(proto, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_spelled_out_skip_layer_norm_computes_the_fused_outputs_under_their_names():
    import onnx_ir as ir

    from kiln.backends.onnxruntime import _spell_out_skip_layer_norm

    proto = _skip_layer_norm_model(["y", "", "", "sum"])
    model = ir.from_proto(proto)
    assert _spell_out_skip_layer_norm(model) == 1
    assert sorted(n.op_type for n in model.graph) == ["Add", "Add", "LayerNormalization"]
    assert [v.name for v in model.graph.outputs] == ["y", "sum"]
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 3, 8)).astype(np.float32) for n in ("x", "skip")}
    for got, want in zip(_run(ir.to_proto(model), feeds), _run(proto, feeds)):
        np.testing.assert_allclose(got, want, rtol=FP32.rtol, atol=FP32.atol)


def test_skip_layer_norm_whose_mean_is_read_stays_fused():
    import onnx_ir as ir

    from kiln.backends.onnxruntime import _spell_out_skip_layer_norm

    model = ir.from_proto(_skip_layer_norm_model(["y", "mean", "", ""]))
    assert _spell_out_skip_layer_norm(model) == 0
    assert [n.op_type for n in model.graph] == ["SkipLayerNormalization"]
