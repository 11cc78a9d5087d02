import pytest
import torch

from backends.conftest import make_partition
from kiln.backends.onnxruntime import OnnxRuntimeBackend
from kiln.hardware_profiles import load
from kiln.types import Precision
from kiln.verify import TOLERANCE

backend = OnnxRuntimeBackend()
if not backend.available().ok:
    pytest.skip(backend.available().reason, allow_module_level=True)

TOL = TOLERANCE[Precision.FP32]
aten = torch.ops.aten


def _node(target):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(target, (x,))


def test_onnxruntime_reports_its_version():
    status = backend.available()
    assert status.ok and status.version


@pytest.mark.parametrize("op", [aten.conv2d.default, aten.linear.default, aten.layer_norm.default,
                                aten.scaled_dot_product_attention.default, aten.gelu.default, aten.embedding.default,
                                aten.to.dtype_layout, aten._assert_tensor_metadata.default, aten.hardtanh.default])
def test_onnxruntime_supports_the_op_families_real_models_use(op):
    assert backend.supports(_node(op), load("cpu-x86").primary).ok


def test_onnxruntime_names_an_op_the_exporter_cannot_convert():
    support = backend.supports(_node(aten.kthvalue.default), load("cpu-x86").primary)
    assert not support.ok and "kthvalue" in support.reason


def test_onnxruntime_engine_matches_eager_at_several_batch_sizes(convnet_partition, settings):
    graph, _ = convnet_partition
    engine = backend.compile(graph, settings)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 8, 8)
        for got, want in zip(engine(x), graph.gm(x)):
            torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol)


def test_onnxruntime_engine_saves_and_loads_to_the_same_outputs(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    engine = backend.compile(graph, settings)
    out_dir = tmp_path / "saved"
    out_dir.mkdir()
    entry = engine.save(out_dir, "p0")
    assert entry.files == ["p0.onnx", "p0.onnx.data"] and entry.backend == "onnxruntime"
    reloaded = backend.load(out_dir, entry, settings)
    x = torch.randn(3, 3, 8, 8)
    for a, b in zip(engine(x), reloaded(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_onnxruntime_engine_keeps_its_weights_beside_the_graph_and_saves_copies(settings, tmp_path):
    """The weights live in '<name>.data' (ORT maps them instead of parsing one protobuf). A save
    outside the build folder copies both files, so the artifact shares nothing with the build."""
    graph, _ = make_partition(torch.nn.Linear(256, 256).eval(), (torch.randn(2, 256),))
    engine = backend.compile(graph, settings)
    weights = engine.model_path.with_name(engine.model_path.name + ".data")
    assert weights.stat().st_size >= 256 * 256 * 4 > engine.model_path.stat().st_size
    out_dir = tmp_path.parent / (tmp_path.name + "-saved")
    out_dir.mkdir()
    entry = engine.save(out_dir, "p0")
    for name in entry.files:
        assert (out_dir / name).stat().st_nlink == 1




class _SelfAttention(torch.nn.Module):
    """BERT-style self-attention over SDPA: ORT runs it as one fused attention op only when
    kiln lowers it (ORT's session optimizer does not fuse attention by itself)."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, s, d = x.shape
        split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("fuse", [True, False])
def test_onnxruntime_lowers_into_fused_ops_only_when_fusion_is_on(fuse, tmp_path):
    from dataclasses import replace

    from kiln.backends.base import BackendSettings

    graph, _ = make_partition(_SelfAttention().eval(), (torch.randn(2, 8, 32),))
    settings = replace(BackendSettings(load("cpu-x86").primary, threads=2, workdir=tmp_path), fuse=fuse)
    engine = backend.compile(graph, settings)
    assert engine.summary.startswith("ORT runs ")
    assert ("Attention" in engine.summary.split(";")[0]) is fuse, engine.summary
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(engine(x)[0], graph.gm(x)[0], rtol=TOL.rtol, atol=TOL.atol)


@pytest.mark.parametrize("profile, device, provider, hint", [
    ("intel-npu", "npu", "OpenVINOExecutionProvider", "onnxruntime-openvino"),
    ("ascend-910", "npu", "CANNExecutionProvider", "CANN"),
    ("jetson-orin", "dla", "TensorrtExecutionProvider", "TensorRT"),
])
def test_onnxruntime_names_the_execution_provider_an_npu_needs_and_how_to_get_it(profile, device, provider, hint):
    import onnxruntime as ort

    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is installed here")
    support = backend.supports(_node(aten.relu.default), load(profile).devices[device])
    assert not support.ok and provider in support.reason and hint in support.reason


def test_onnxruntime_runs_an_npu_through_its_provider_with_the_cpu_provider_behind_it(monkeypatch):
    import onnxruntime as ort

    from kiln.backends import onnxruntime as ort_backend

    npu = load("intel-npu").devices["npu"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    assert backend.supports(_node(aten.relu.default), npu).ok
    assert ort_backend._providers_for(npu) == [("OpenVINOExecutionProvider", {"device_type": "NPU"}),
                                               ("CPUExecutionProvider", {})]


def test_onnxruntime_refuses_an_npu_no_provider_drives_naming_the_known_ones():
    from dataclasses import replace

    npu = replace(load("intel-npu").devices["npu"], model="Acme Tensor Engine 1")
    support = backend.supports(_node(aten.relu.default), npu)
    assert not support.ok and "Acme Tensor Engine 1" in support.reason and "QNNExecutionProvider" in support.reason


def test_onnxruntime_takes_an_in_place_op_on_an_intermediate_but_not_on_an_input():
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    total = graph.call_function(aten.add.Tensor, (x, y))
    residual = graph.call_function(aten.add_.Tensor, (total, y))  # transformers' ResNet: hidden += residual
    on_input = graph.call_function(aten.add_.Tensor, (x, y))
    cpu = load("cpu-x86").primary
    assert backend.supports(residual, cpu).ok
    support = backend.supports(on_input, cpu)
    assert not support.ok and "in place" in support.reason and "x" in support.reason


def test_onnxruntime_sessions_bound_their_worker_threads_spinning():
    # ORT's default lets its intra-op threads spin on after a call returns, taking the cores from
    # whatever runs next; kiln's sessions bound the spin (bench/ort_spinning.py measures what the
    # bound buys: PyTorch work right after an ORT call runs at 1.2x its time alone instead of 2.8x)
    import kiln
    from kiln.backends.onnxruntime import INTRA_OP_SPIN_US

    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).eval()
    compiled = kiln.optimize(model, "cpu-x86", torch.randn(64, 256), backend="onnxruntime", precision="fp32", threads=2,
                             cache=False, isolate=False)
    options = compiled.engines["p0"].session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.spin_duration_us") == str(INTRA_OP_SPIN_US)
    assert options.intra_op_num_threads == 2