"""TensorRT precision through strong typing, checked on CPU: the builder settings each plan kind
yields on TensorRT 10 and 11, the casts and Q/DQ nodes kiln writes into the ONNX graph, the
dtype tables, the version checks, and the order of the GPU check before any TensorRT object.
What these settings and graphs do inside TensorRT needs a GPU (scripts/gpu_check.sh); that
every name they lead to exists in the real TensorRT is tests/backends/test_tensorrt_conformance.py."""

import dataclasses
import types
from pathlib import Path

import numpy
import pytest
import torch
from torch import nn

from kiln.backends import tensorrt as trt_backend
from kiln.backends.base import BackendSettings, EngineEntry
from kiln.backends.tensorrt_api import BUILDER_FLAGS, DATATYPES, DYNAMIC, NETWORK_FLAGS, scan, scan_source
from kiln.backends.tensorrt_config import (DATATYPE_PRECISION, TORCH_DTYPE, TRT_DATATYPE, PrecisionPlan, derive_build_config,
                                           torch_dtype, trt_datatype)
from kiln.backends.tensorrt_precision import export_lowered
from kiln.errors import BackendError, BackendUnavailable
from kiln.hardware_profiles import load
from kiln.ir import LayerPlan, Scheme
from kiln.ir import PrecisionPlan as LayerPrecisionPlan
from kiln.precision.lowering import with_lowered_weights
from kiln.types import DTYPES, Precision
from tests.backends.conftest import make_partition

ENGINE = Path("/tmp/kiln-test/p0.plan")
IN_BOTH = {flag for flag, majors in BUILDER_FLAGS.items() if {10, 11} <= set(majors)}

# One plan per kind the issue names, as the backend hands them to derive_build_config: the
# partition's lowest precision, the ONNX nodes the graph's types put elsewhere, Q/DQ present.
PLAN_KINDS = {
    "fp32-with-tf32": PrecisionPlan(Precision.TF32, {"node_head": Precision.FP32}),
    "mixed fp16/fp32": PrecisionPlan(Precision.FP16, {"node_linear": Precision.FP16}),
    "int8 Q/DQ with an fp32 layer": PrecisionPlan(Precision.INT8, {"node_conv2d": Precision.INT8}, explicit_quantization=True),
    "fp8 on h100": PrecisionPlan(Precision.FP8, {"node_linear": Precision.FP8}, explicit_quantization=True),
}


def derive(profile: str, plan: PrecisionPlan, major: int):
    return derive_build_config(load(profile).primary, plan, (), ENGINE, trt_major=major)


def all_flags(config) -> set[str]:
    return set(config.flags | config.cleared_flags)


# --- builder settings per plan kind -------------------------------------------------------------

@pytest.mark.parametrize("major", [10, 11])
@pytest.mark.parametrize("profile", ["h100", "a100"])
@pytest.mark.parametrize("kind", [k for k in PLAN_KINDS if k != "fp8 on h100"])
def test_each_plan_kind_builds_strongly_typed_with_flags_both_majors_have(kind, profile, major):
    config = derive(profile, PLAN_KINDS[kind], major)
    assert config.strongly_typed
    assert all_flags(config) <= IN_BOTH, all_flags(config) - IN_BOTH
    assert all(major in NETWORK_FLAGS[f] for f in config.network_flags)
    # no weak-typing precision flag, whatever the plan
    assert not all_flags(config) & {"FP16", "BF16", "INT8", "FP8", "INT4", "OBEY_PRECISION_CONSTRAINTS"}


@pytest.mark.parametrize("major", [10, 11])
def test_fp8_plan_on_h100_builds_strongly_typed_with_flags_both_majors_have_and_a100_refuses_it(major):
    config = derive("h100", PLAN_KINDS["fp8 on h100"], major)
    assert config.strongly_typed and all_flags(config) <= IN_BOTH and config.flags == frozenset()
    with pytest.raises(BackendError, match="fp8, which NVIDIA A100-SXM4-80GB does not run"):
        derive("a100", PLAN_KINDS["fp8 on h100"], major)


def test_a_tf32_plan_keeping_a_layer_at_fp32_turns_tf32_off_for_the_network_and_says_so():
    held = derive("h100", PLAN_KINDS["fp32-with-tf32"], 11)
    assert held.flags == frozenset() and held.cleared_flags == {"TF32"}
    assert any("TF32 off" in note and "node_head" in note for note in held.notes)
    whole = derive("h100", PrecisionPlan(Precision.TF32), 11)
    assert whole.flags == {"TF32"} and whole.cleared_flags == frozenset()


def test_layer_precisions_are_recorded_for_the_report_not_replayed_on_layers():
    config = derive("a100", PLAN_KINDS["mixed fp16/fp32"], 10)
    assert config.to_meta()["layer_precisions"] == {"node_linear": "fp16"}
    assert config.to_meta()["network_flags"] == ["STRONGLY_TYPED"] and config.to_meta()["tensorrt_major"] == 10
    assert any("strongly typed: 1 ONNX nodes at fp16" in note for note in config.notes)
    assert derive("a100", PLAN_KINDS["mixed fp16/fp32"], 11).network_flags == frozenset()


# --- the plan in the ONNX graph --------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.b(torch.relu(self.a(y))) + y.sum(-1, keepdim=True)  # y is read beside layer a


def _planned(schemes: dict[str, Scheme], ranges: dict[str, tuple[float, float]] | None = None, calibration=()):
    torch.manual_seed(0)
    graph, _ = make_partition(Net().eval(), (torch.randn(2, 3, 8, 8),))
    weights = {n.name: n.args[1].target for n in graph.gm.graph.nodes
               if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)}
    layers = [LayerPlan(name, "conv" if name.startswith("conv") else "linear", weight, schemes.get(name, Scheme.FP32),
                        input_range=(ranges or {}).get(name)) for name, weight in weights.items()]
    graph = dataclasses.replace(graph, precision=LayerPrecisionPlan(layers), calibration=tuple(calibration))
    return with_lowered_weights(graph)  # as build_engines hands partitions to backends


def _model(path):
    import onnx

    model = onnx.load(str(path))
    return model, {n.name: n for n in model.graph.node}, {i.name: i for i in model.graph.initializer}


def _array(initializer):
    from onnx import numpy_helper

    return numpy_helper.to_array(initializer)


def _producer(nodes, tensor):
    return next((n for n in nodes.values() if tensor in n.output), None)


def test_fp16_layers_run_between_casts_with_fp16_weights_and_the_fp32_layer_stays_fp32(tmp_path):
    from onnx import TensorProto

    partition = _planned({"linear": Scheme.FP16})
    lowered = export_lowered(partition, tmp_path / "p0.onnx")
    model, nodes, inits = _model(tmp_path / "p0.onnx")
    (fp16_node,) = [name for name, p in lowered.layer_precisions.items() if p is Precision.FP16]
    layer = nodes[fp16_node]
    cast_in = _producer(nodes, layer.input[0])
    assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == TensorProto.FLOAT16
    assert inits[layer.input[1]].data_type == TensorProto.FLOAT16
    assert "fp16: 1 layers between casts" in lowered.summary
    casts_up = [n for n in nodes.values() if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT]
    assert casts_up, "the fp16 layer's output is cast back to fp32"
    others = [n for n in nodes.values() if n.op_type in ("Gemm", "MatMul", "Conv") and n.name != fp16_node]
    assert others and all(inits[n.input[1]].data_type == TensorProto.FLOAT for n in others if n.input[1] in inits)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes.values())


def _qdq_of(nodes, layer, index):
    dequantize = _producer(nodes, layer.input[index])
    quantize = _producer(nodes, dequantize.input[0])
    assert dequantize.op_type == "DequantizeLinear" and quantize.op_type == "QuantizeLinear"
    return quantize, dequantize


def test_int8_layers_get_symmetric_qdq_with_kilns_range_and_weight_grid_and_the_fp32_layer_none(tmp_path):
    from onnx import TensorProto

    partition = _planned({"conv2d": Scheme.INT8_STATIC, "linear": Scheme.INT8_STATIC},
                         {"conv2d": (-3.0, 3.5), "linear": (0.0, 2.0)})
    lowered = export_lowered(partition, tmp_path / "p0.onnx")
    model, nodes, inits = _model(tmp_path / "p0.onnx")
    assert set(lowered.layer_precisions.values()) == {Precision.INT8} and len(lowered.layer_precisions) == 2
    for name, amax in (("node_conv2d", 3.5), ("node_linear", 2.0)):
        layer = nodes[name]
        quantize, dequantize = _qdq_of(nodes, layer, 0)
        assert _array(inits[quantize.input[1]]) == pytest.approx(amax / 127)  # ±max(|lo|, |hi|): zero point 0
        assert inits[quantize.input[2]].data_type == TensorProto.INT8 and not _array(inits[quantize.input[2]]).any()
        quantize_w, _ = _qdq_of(nodes, layer, 1)
        weight = _array(inits[quantize_w.input[0]])
        scale = _array(inits[quantize_w.input[1]])
        axis = next(a.i for a in quantize_w.attribute if a.name == "axis")
        shape = [1] * weight.ndim
        shape[axis] = -1
        # kiln's integers come back: the weights sit on kiln's grid, so Q/DQ moves none of them
        integers = numpy.round(weight / scale.reshape(shape))
        assert numpy.abs(integers).max() <= 127
        numpy.testing.assert_allclose(integers * scale.reshape(shape), weight, rtol=1e-6, atol=1e-7)
        assert scale.shape == (weight.shape[axis],)  # per output channel
    # the fp32 layer has none, and y's other reader (the sum) reads the float tensor
    last = nodes["node_linear_1"]
    assert _producer(nodes, last.input[0]).op_type != "DequantizeLinear"
    assert sum(n.op_type == "QuantizeLinear" for n in nodes.values()) == 4


def test_int8_qdq_graph_runs_in_onnx_runtime_close_to_fp32(tmp_path):
    import onnxruntime

    ranges = {"conv2d": (-4.0, 4.0), "linear": (0.0, 1.5)}
    partition = _planned({"conv2d": Scheme.INT8_STATIC, "linear": Scheme.INT8_STATIC}, ranges)
    export_lowered(partition, tmp_path / "p0.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "p0.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 8, 8)
    (got,) = session.run(None, {partition.input_names[0]: x.numpy()})
    want = partition.gm(x)
    want = (want[0] if isinstance(want, (tuple, list)) else want).detach().numpy()
    error = numpy.linalg.norm(got - want) / numpy.linalg.norm(want)
    assert 0 < error < 0.05, error  # quantized (not fp32), and near it


def test_fp8_layers_get_per_tensor_e4m3_qdq_with_the_calibrated_input_amax(tmp_path):
    from onnx import TensorProto

    samples = [(torch.randn(2, 3, 8, 8) * 3,), (torch.randn(2, 3, 8, 8),)]
    partition = _planned({"conv2d": Scheme.FP8}, calibration=samples)
    lowered = export_lowered(partition, tmp_path / "p0.onnx")
    model, nodes, inits = _model(tmp_path / "p0.onnx")
    assert lowered.layer_precisions == {"node_conv2d": Precision.FP8}
    quantize, _ = _qdq_of(nodes, nodes["node_conv2d"], 0)
    amax = max(float(s[0].abs().max()) for s in samples)  # the conv reads the model input directly
    assert float(_array(inits[quantize.input[1]])) == pytest.approx(amax / 448, rel=1e-6)
    assert inits[quantize.input[2]].data_type == TensorProto.FLOAT8E4M3FN
    quantize_w, _ = _qdq_of(nodes, nodes["node_conv2d"], 1)
    weight = _array(inits[quantize_w.input[0]])
    assert float(_array(inits[quantize_w.input[1]])) == pytest.approx(numpy.abs(weight).max() / 448, rel=1e-6)
    assert not any(a.name == "axis" for a in quantize_w.attribute)  # per tensor, as kiln simulates fp8


@pytest.mark.parametrize("scheme, reason", [(Scheme.INT8_DYNAMIC, "not per call"), (Scheme.INT4_WEIGHT, "symmetric")])
def test_schemes_tensorrt_cannot_express_are_refused_before_export(tmp_path, scheme, reason):
    partition = _planned({"linear": scheme})
    with pytest.raises(BackendError, match=reason) as info:
        export_lowered(partition, tmp_path / "p0.onnx")
    assert "onnxruntime" in info.value.fix and not (tmp_path / "p0.onnx").exists()


# --- dtypes ------------------------------------------------------------------------------------------

def test_every_tensorrt_datatype_maps_to_torch_or_is_refused_by_name():
    assert set(TORCH_DTYPE) == set(DATATYPES) == set(DATATYPE_PRECISION)
    for name in DATATYPES:
        if TORCH_DTYPE[name] is None:
            with pytest.raises(BackendError, match=f"engine tensor out is {name}, which torch cannot hold"):
                torch_dtype(name, "out", "p0.plan")
        else:
            dtype = torch_dtype(name, "out", "p0.plan")
            assert trt_datatype(dtype, "x") == name  # and back
            torch.empty(2, dtype=dtype)  # a tensor kiln's runner can allocate
    assert {n for n, d in TORCH_DTYPE.items() if d is None} == {"INT4", "FP4"}
    with pytest.raises(BackendError, match="kiln does not know"):
        torch_dtype("FP6", "out", "p0.plan")


def test_kiln_dtypes_and_precisions_map_to_tensorrt_and_back_or_are_refused():
    for name, dtype in DTYPES.items():
        if dtype in (torch.float64, torch.int16):
            with pytest.raises(BackendError, match=f"TensorRT has no type for {dtype}"):
                trt_datatype(dtype, f"input {name}")
        else:
            assert TORCH_DTYPE[trt_datatype(dtype, name)] is dtype
    for precision, datatype in TRT_DATATYPE.items():
        assert datatype in DATATYPES
        back = DATATYPE_PRECISION[datatype]
        assert back is precision or (precision is Precision.TF32 and back is Precision.FP32)


# --- versions and the order of checks ---------------------------------------------------------------

def _fake_trt(version: str):
    made = []

    class Runtime:  # a real Runtime without a GPU crashes the process when used or destroyed
        def __init__(self, logger):
            made.append(self)

    return types.SimpleNamespace(__version__=version, Runtime=Runtime, ILogger=object), made


def test_an_installed_tensorrt_of_another_major_is_unavailable_naming_its_version(monkeypatch):
    fake, _ = _fake_trt("9.3.0.1")
    monkeypatch.setattr(trt_backend, "_import_trt", lambda: fake)
    status = trt_backend.TensorRTBackend().available()
    assert not status.ok and "TensorRT 9.3.0.1 is installed; kiln builds with TensorRT 10 and 11 only" in status.reason
    assert status.install_hint == "pip install 'tensorrt>=10,<12'" and status.version == "9.3.0.1"


def test_load_and_compile_check_for_a_gpu_before_creating_any_tensorrt_object(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    fake, made = _fake_trt("11.4.0.106")
    monkeypatch.setattr(trt_backend, "_import_trt", lambda: fake)
    backend = trt_backend.TensorRTBackend()
    settings = BackendSettings(load("h100").primary, threads=2, workdir=tmp_path)
    entry = EngineEntry("tensorrt", ["p0.plan"], {"built_with": {}, "io": {}})
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is present"):
        backend.load(tmp_path, entry, settings)
    graph, _ = make_partition(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    with pytest.raises(BackendUnavailable, match="tensorrt 11.4.0.106 is installed but no CUDA GPU"):
        backend.compile(graph, settings)
    assert made == []


# --- what the conformance check reads -------------------------------------------------------------------

def test_the_scan_reads_every_tensorrt_call_the_backend_makes():
    found = {(s.kind, s.name) for use in scan() for s in use.steps}
    calls = {"Builder", "create_network", "OnnxParser", "parse_from_file", "get_error", "num_errors", "create_builder_config",
             "set_memory_pool_limit", "set_flag", "clear_flag", "create_optimization_profile", "set_shape",
             "add_optimization_profile", "create_timing_cache", "set_timing_cache", "build_serialized_network",
             "get_timing_cache", "serialize", "Runtime", "deserialize_cuda_engine", "create_execution_context",
             "num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "set_input_shape",
             "set_tensor_address", "get_tensor_shape", "execute_async_v3", "node_name", "node_operator", "desc"}
    assert {("attr", name) for name in calls} <= found, calls - {n for k, n in found}
    assert {("set", "hardware_compatibility_level"), ("set", "default_device_type"), ("set", "DLA_core"),
            ("override", "log")} <= found
    # every getattr over a TensorRT enum draws its names from a table the check walks
    assert {s.name for use in scan() for s in use.steps if s.kind == "getattr"} <= set(DYNAMIC)


def test_the_scan_follows_annotations_assignments_self_attributes_writes_and_overrides():
    source = '''
def build(trt, config: trt.IBuilderConfig, flag):
    network = trt.Builder(logger).create_network(0)
    network.add_input("x", trt.DataType.FLOAT, (1,))
    config.set_timing_cache(cache, ignore_mismatch=False)
    config.DLA_core = 0
    config.set_flag(getattr(trt.BuilderFlag, flag))

class Engine:
    def __init__(self, trt):
        self._runtime = trt.Runtime(None)

    def run(self):
        return self._runtime.deserialize_cuda_engine(b"")

def logger(trt):
    class Log(trt.ILogger):
        def log(self, severity, msg):
            pass
'''
    texts = {use.text() for use in scan_source(source)}
    assert {"trt.Builder(_).create_network(_).add_input(_, _, _)", "trt.DataType.FLOAT",
            "trt.IBuilderConfig<instance>.set_timing_cache(_, ignore_mismatch=_)",
            "trt.IBuilderConfig<instance>.DLA_core = _", "trt.IBuilderConfig<instance>.set_flag(_)",
            "trt.BuilderFlag.<getattr>", "trt.Runtime(_).deserialize_cuda_engine(_)",
            "trt.ILogger overrides log(2 args)"} <= texts, texts


# --- on an NVIDIA machine with TensorRT only ------------------------------------------------------------

@pytest.mark.parametrize("schemes, precision, bound", [
    ({"linear": Scheme.FP16}, Precision.FP16, 1e-2),
    ({"conv2d": Scheme.BF16, "linear": Scheme.BF16}, Precision.BF16, 3e-2),
    ({"conv2d": Scheme.INT8_STATIC, "linear": Scheme.INT8_STATIC}, Precision.INT8, 5e-2),
    ({"conv2d": Scheme.FP8, "linear": Scheme.FP8}, Precision.FP8, 1e-1),
])
def test_a_strongly_typed_engine_runs_its_plan_within_the_plans_error(tmp_path, schemes, precision, bound):
    from kiln.backends.tensorrt import TensorRTBackend
    from tests.backends.test_tensorrt import layerwise

    status = TensorRTBackend().available()
    if not status.ok:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {status.reason}")
    profile = "h100" if torch.cuda.get_device_capability() >= (9, 0) else "a100"
    if precision not in load(profile).primary.precisions:
        pytest.skip(f"this GPU ({torch.cuda.get_device_name()}) does not run {precision.value}")
    samples = [(torch.randn(2, 3, 8, 8),) for _ in range(4)]
    ranges = {"conv2d": (-4.5, 4.5), "linear": (0.0, 3.0)}
    partition = _planned(schemes, ranges if precision is Precision.INT8 else None, calibration=samples)
    settings = BackendSettings(load(profile).primary, threads=2, workdir=tmp_path, precision=partition.precision.lowest())
    engine = TensorRTBackend().compile(partition, settings)
    assert "strongly typed" in engine.summary and engine.config["strongly_typed"]
    x = torch.randn(2, 3, 8, 8)
    (got,) = engine(x)
    want = partition.gm(x)
    want = want[0] if isinstance(want, (tuple, list)) else want
    error = float((got - want).norm() / want.norm())
    if not error < bound:
        pytest.fail(f"relative error {error:.3g} over {bound} ({engine.summary}); "
                    f"{layerwise(tmp_path / 'p0.tensorrt.onnx', partition, (x,), precision)}")
