"""What ONNX Runtime really fuses once kiln's passes have run: read from the graph ORT itself
optimises (SessionOptions.optimized_model_filepath), not from kiln's own counts."""

import collections

import pytest
import torch
from torch import nn

import kiln
from kiln.backends.base import PartitionGraph
from kiln.backends.onnxruntime import OnnxRuntimeBackend
from kiln.frontend.capture import capture
from kiln.hardware_profiles import load
from kiln.options import CompileOptions
from kiln.passes import pipeline
from kiln.passes.context import PassContext
from kiln.types import Precision
from kiln.verify import TOLERANCE

backend = OnnxRuntimeBackend()
if not backend.available().ok:
    pytest.skip(backend.available().reason, allow_module_level=True)

TOL = TOLERANCE[Precision.FP32]


def _compile(model: nn.Module, inputs: tuple, settings):
    captured = capture(model.eval(), inputs)
    ctx = PassContext(load("cpu-x86"), CompileOptions(), captured.input_spec)
    records = pipeline.run(captured.gm, ctx)
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
    ort.InferenceSession(str(engine.model_path), options, providers=["CPUExecutionProvider"])
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


def test_ort_fuses_residual_add_and_layer_norm_in_tiny_bert(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    compiled = kiln.optimize(model, "cpu-x86", (torch.randint(0, 100, (2, 16)),), backend="onnxruntime", cache=False)
    chosen = next(c for c in compiled.report.candidates if c.status == "chosen")
    # two per layer: after attention and after the feed-forward block
    assert "skip_layer_normalization 4" in chosen.detail
    assert "bias_gelu 2" in chosen.detail
