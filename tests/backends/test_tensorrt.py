"""TensorRT backend: the decisions kiln makes before TensorRT is called (checked on CPU), and
an end-to-end build that runs only where TensorRT and a CUDA GPU are present."""

from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.backends import registry
from kiln.build import select
from kiln.backends.base import Availability, BackendSettings, Support
from kiln.backends.onnxruntime import export_onnx, exporter_supports
from kiln.backends.tensorrt import CAPABILITIES, TensorRTBackend, check_loadable
from kiln.backends.tensorrt_config import (EngineFacts, ParserError, PrecisionPlan, ShapeProfile, derive_build_config,
                                           has_qdq, is_2_4_sparse, layer_precisions, onnx_node_owners,
                                           optimization_profiles, parser_failures, sparse_weight_nodes, trt_supports)
from kiln.errors import ArtifactError, BackendError, BackendUnavailable
from kiln.hardware_profiles import load
from kiln.types import Dim, NodeDecision, Precision
from kiln.verify import TOLERANCE, OutputCheck
from tests.backends.conftest import ConvNet, make_partition

GiB = 1 << 30
ENGINE = Path("/tmp/kiln-test/p0.plan")


def derive(profile: str, precision=Precision.FP32, device: str = "gpu", trt_major: int = 11, **plan):
    return derive_build_config(load(profile).devices[device], PrecisionPlan(precision, **plan), (), ENGINE, trt_major=trt_major)


# --- profile -> builder config ---------------------------------------------------------------

def test_a100_fp32_builds_strongly_typed_with_tf32_cleared_and_a_quarter_of_memory_as_workspace():
    config = derive("a100")
    assert config.strongly_typed and config.flags == frozenset()
    assert config.cleared_flags == {"TF32"} and any("TF32 cleared" in n for n in config.notes)
    assert config.workspace_bytes == 20 * GiB  # 80 GB / 4
    assert config.timing_cache == ENGINE.with_suffix(".timing.cache")
    assert config.hardware_compatibility == "NONE" and not config.version_compatible


@pytest.mark.parametrize("major", [10, 11])
def test_fp16_and_bf16_plans_build_strongly_typed_with_no_precision_flags_on_both_majors(major):
    fp16, bf16 = derive("a100", Precision.FP16, trt_major=major), derive("a100", Precision.BF16, trt_major=major)
    for config in (fp16, bf16):
        assert config.strongly_typed and config.flags == frozenset() and config.cleared_flags == {"TF32"}
    # 10 is asked for strong typing; 11 has no other kind and deprecates the flag
    assert fp16.network_flags == ({"STRONGLY_TYPED"} if major == 10 else frozenset())


def test_bf16_is_refused_on_t4_which_lists_no_bf16():
    with pytest.raises(BackendError, match="bf16, which NVIDIA T4 does not run"):
        derive("t4", Precision.BF16)
    assert derive("t4", Precision.FP16).flags == frozenset()
    assert derive("t4").workspace_bytes == 4 * GiB


def test_fp8_runs_only_on_h100_and_only_with_qdq_scales():
    config = derive("h100", Precision.FP8, explicit_quantization=True)
    assert config.strongly_typed and "FP8" not in config.flags  # Q/DQ types decide
    with pytest.raises(BackendError, match="fp8, which NVIDIA A100-SXM4-80GB does not run"):
        derive("a100", Precision.FP8, explicit_quantization=True)
    with pytest.raises(BackendError, match="fp8 needs quantization scales from Q/DQ nodes"):
        derive("h100", Precision.FP8)


def test_int8_needs_qdq_nodes_in_the_graph_on_both_majors():
    for major in (10, 11):
        with pytest.raises(BackendError, match="int8 needs quantization scales from Q/DQ nodes") as info:
            derive("t4", Precision.INT8, trt_major=major)
        assert "calibration data" in info.value.fix
        qdq = derive("t4", Precision.INT8, explicit_quantization=True, trt_major=major)
        assert qdq.strongly_typed and qdq.flags == frozenset()


def test_jetson_orin_gpu_shares_memory_so_its_workspace_is_an_eighth_and_it_takes_bf16():
    config = derive("jetson-orin", Precision.BF16)
    assert config.workspace_bytes == 8 * GiB  # 64 GB unified / 8
    assert config.flags == frozenset() and config.strongly_typed and config.dla_core is None


def test_jetson_orin_dla_is_weakly_typed_with_precision_flags_on_tensorrt_10_only():
    old = derive("jetson-orin", Precision.FP16, device="dla", trt_major=10)
    assert old.dla_core == 0 and old.flags == {"FP16", "GPU_FALLBACK"} and not old.strongly_typed
    assert not old.network_flags and any("weakly typed" in n for n in old.notes)
    new = derive("jetson-orin", Precision.FP16, device="dla", trt_major=11)
    assert new.dla_core == 0 and new.flags == {"GPU_FALLBACK"} and new.strongly_typed
    with pytest.raises(BackendError, match="DLA runs fp16 and int8 only"):
        derive_build_config(_dla_with_fp32(), PrecisionPlan(Precision.FP32), (), ENGINE)


def _dla_with_fp32():
    import dataclasses

    dla = load("jetson-orin").devices["dla"]
    return dataclasses.replace(dla, peak_tflops={**dla.peak_tflops, Precision.FP32: 1.0})


@pytest.mark.parametrize("major", [9, 12])
def test_a_tensorrt_major_kiln_does_not_build_with_is_refused_naming_it(major):
    with pytest.raises(BackendUnavailable, match=f"TensorRT {major}.x is installed; kiln builds with TensorRT 10 and 11") as info:
        derive("h100", trt_major=major)
    assert "tensorrt>=10,<12" in info.value.fix


def test_version_and_hardware_compatibility_are_recorded():
    config = derive_build_config(load("a100").primary, PrecisionPlan(), (), ENGINE, hardware_compatibility="AMPERE_PLUS",
                                 version_compatible=True)
    assert "VERSION_COMPATIBLE" in config.flags
    meta = config.to_meta()
    assert meta["hardware_compatibility"] == "AMPERE_PLUS" and meta["version_compatible"] is True
    with pytest.raises(BackendError, match="unknown hardware compatibility level"):
        derive_build_config(load("a100").primary, PrecisionPlan(), (), ENGINE, hardware_compatibility="TURING_PLUS")


# --- optimization profiles ---------------------------------------------------------------------

def test_optimization_profile_spans_the_dynamic_dim_range_and_tunes_for_the_example_size():
    torch.manual_seed(0)
    graph, _ = make_partition(ConvNet().eval(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: Dim("batch", min=1, max=64)}})
    profiles = optimization_profiles(graph.input_names, graph.example_inputs, graph.dynamic_shapes)
    assert profiles == (ShapeProfile(graph.input_names[0], (1, 3, 8, 8), (2, 3, 8, 8), (64, 3, 8, 8)),)
    config = derive_build_config(load("a100").primary, PrecisionPlan(), profiles, ENGINE)
    assert config.to_meta()["profiles"][0]["max"] == [64, 3, 8, 8]


def test_static_partitions_need_no_optimization_profile_and_huge_ranges_are_noted():
    graph, _ = make_partition(ConvNet().eval(), (torch.randn(2, 3, 8, 8),))
    assert optimization_profiles(graph.input_names, graph.example_inputs, graph.dynamic_shapes) == ()
    wide = ShapeProfile("x", (1, 3, 8, 8), (2, 3, 8, 8), (4096, 3, 8, 8))
    config = derive_build_config(load("a100").primary, PrecisionPlan(), (wide,), ENGINE)
    assert any("reserves activation memory for the max" in n for n in config.notes)


# --- per-layer precision from the precision plan ------------------------------------------------

def test_node_decisions_are_recorded_per_onnx_node_and_set_no_builder_flag(tmp_path):
    torch.manual_seed(0)
    graph, _ = make_partition(ConvNet().eval(), (torch.randn(2, 3, 8, 8),))
    linear = next(n for n in graph.gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    linear.meta["kiln"] = NodeDecision(precision=Precision.FP16, reasons=("test: fp16 head",))
    program = export_onnx(graph, tmp_path / "p0.onnx")
    owners = onnx_node_owners(program, graph.gm)
    assert owners and set(owners.values()) <= {n.name for n in graph.gm.graph.nodes}
    wanted = layer_precisions(graph.gm, owners, Precision.FP32)
    assert wanted and set(wanted.values()) == {Precision.FP16}
    assert {owners[name] for name in wanted} == {linear.name}
    config = derive_build_config(load("a100").primary, PrecisionPlan(Precision.FP16, wanted), (), ENGINE)
    # recorded, not pinned: the graph's casts carry the precision into a strongly typed network
    assert config.flags == frozenset() and config.strongly_typed
    assert dict(config.layer_precisions) == wanted and config.to_meta()["layer_precisions"] == {k: "fp16" for k in wanted}
    assert not has_qdq(n.op_type for n in program.model.graph)


def test_layer_constraints_reach_the_right_layer_when_re_export_renumbers_fx_nodes(tmp_path):
    from tests.backends.test_onnxruntime_precision import _renumbered_partition

    graph, (first, second, third) = _renumbered_partition()  # named linear_9, linear, linear_1
    second.meta["kiln"] = NodeDecision(precision=Precision.FP16, reasons=("test: the middle layer",))
    program = export_onnx(graph, tmp_path / "p0.onnx")
    owners = onnx_node_owners(program, graph.gm)
    wanted = layer_precisions(graph.gm, owners, Precision.FP32)
    assert wanted and {owners[name] for name in wanted} == {second.name}
    (onnx_node,) = [n for n in program.model.graph if n.name in wanted]
    assert "b.weight" in " ".join(v.name for v in onnx_node.inputs if v is not None)


def test_two_four_sparse_weights_set_sparse_weights_only_where_the_device_has_sparse_tensor_cores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(2))  # two zeros in every group of four
    assert is_2_4_sparse(model[0].weight) and not is_2_4_sparse(model[2].weight)
    graph, _ = make_partition(model, (torch.randn(3, 8),))
    sparse = sparse_weight_nodes(graph.gm)
    assert len(sparse) == 1
    assert "SPARSE_WEIGHTS" in derive("a100", sparse_layers=sparse).flags
    t4 = derive("t4", sparse_layers=sparse)
    assert "SPARSE_WEIGHTS" not in t4.flags and any("no sparse tensor cores" in n for n in t4.notes)


# --- capability table ----------------------------------------------------------------------------

class _Ops(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _node(fn, x, target):
    graph, _ = make_partition(_Ops(fn).eval(), (x,))
    return next(n for n in graph.gm.graph.nodes if n.target is target)


@pytest.mark.parametrize("fn, x, target, reason", [
    (lambda x: torch.topk(x, 4000).values, torch.randn(5000), torch.ops.aten.topk.default, "k < 3840"),
    (lambda x: (x > 0) & (x < 1), torch.randn(4), torch.ops.aten.__and__.Tensor, None),  # bool: ONNX And
    (lambda x: x.int() & x.int(), torch.randn(4), torch.ops.aten.__and__.Tensor, "no BitwiseAnd on integers"),
    (lambda x: x.double() * 2, torch.randn(4), torch.ops.aten.mul.Tensor, "no float64"),
    (lambda x: torch.nn.functional.max_pool2d(x, 2, dilation=2), torch.randn(1, 1, 8, 8), torch.ops.aten.max_pool2d.default,
     "without dilation"),
    (lambda x: x.reshape(1, 1, 1, 1, 1, 1, 1, 2, 2), torch.randn(4), torch.ops.aten.reshape.default, "at most 8 dimensions"),
])
def test_capability_table_refuses_what_tensorrt_cannot_run_with_the_reason(fn, x, target, reason):
    node = _node(fn, x, target)
    support = trt_supports(node, exporter_supports)
    if reason is None:
        assert support.ok, support.reason
    else:
        assert not support.ok and reason in support.reason


def test_capability_table_takes_plain_ops_that_onnx_exports():
    node = _node(lambda x: torch.relu(x) + 1, torch.randn(4), torch.ops.aten.relu.default)
    assert trt_supports(node, exporter_supports).ok


def test_parser_refusals_become_unsupported_nodes_with_the_parser_reason():
    errors = [ParserError("node_topk", "TopK", "K exceeds the maximum value allowed (3840)."),
              ParserError("node_topk", "TopK", "second error on the same node"),
              ParserError("node_Unique_3", "Unique", "No importer registered for op: Unique")]
    failures = parser_failures(errors, {"node_topk": "topk"})
    assert set(failures) == {"topk", "node_Unique_3"}
    assert failures["topk"] == Support(False, "TensorRT's ONNX parser refused TopK node node_topk: K exceeds the maximum value allowed (3840).")
    assert "No importer registered for op: Unique" in failures["node_Unique_3"].reason


# --- artifact compatibility ------------------------------------------------------------------------

BUILT = EngineFacts("10.3.0", (8, 0), "NVIDIA A100-SXM4-80GB")


def test_load_refuses_an_engine_from_another_tensorrt_version():
    with pytest.raises(ArtifactError) as info:
        check_loadable({"built_with": BUILT.to_meta()}, "10.4.0", (8, 0), "NVIDIA A100-SXM4-80GB", "model.kiln")
    message = str(info.value)
    assert "TensorRT 10.3.0" in message and "10.4.0" in message and "model.kiln" in message and "kiln compile" in message


def test_load_refuses_an_engine_from_another_tensorrt_major_even_when_version_compatible():
    portable = EngineFacts("10.16.1.11", (9, 0), "NVIDIA H100 80GB HBM3", "AMPERE_PLUS", version_compatible=True)
    with pytest.raises(ArtifactError) as info:
        check_loadable({"built_with": portable.to_meta()}, "11.4.0.106", (9, 0), "NVIDIA H100 80GB HBM3", "model.kiln")
    message = str(info.value)
    assert "TensorRT 10.16.1.11 (major 10)" in message and "TensorRT 11.4.0.106 (major 11)" in message
    assert "model.kiln" in message and "kiln compile" in message
    # and the other way: an engine from a newer major never runs on an older one
    newer = EngineFacts("11.4.0.106", (9, 0), "NVIDIA H100 80GB HBM3", version_compatible=True)
    with pytest.raises(ArtifactError, match="major 11.*major 10"):
        check_loadable({"built_with": newer.to_meta()}, "10.16.1.11", (9, 0), "NVIDIA H100 80GB HBM3", "m")


def test_load_refuses_an_engine_built_for_another_compute_capability():
    with pytest.raises(ArtifactError, match="compute capability 8.0 .*is compute capability 9.0"):
        check_loadable({"built_with": BUILT.to_meta()}, "10.3.0", (9, 0), "NVIDIA H100 80GB HBM3", "model.kiln")


def test_load_accepts_the_same_version_and_gpu_and_honours_compatibility_levels():
    assert check_loadable({"built_with": BUILT.to_meta()}, "10.3.0", (8, 0), "NVIDIA A100-SXM4-80GB", "m") == BUILT
    portable = EngineFacts("10.3.0", (8, 0), "NVIDIA A100", "AMPERE_PLUS", version_compatible=True)
    assert check_loadable({"built_with": portable.to_meta()}, "10.5.1", (9, 0), "NVIDIA H100", "m") == portable
    with pytest.raises(ArtifactError, match="Ampere and newer"):
        check_loadable({"built_with": portable.to_meta()}, "10.5.1", (7, 5), "Tesla T4", "m")
    with pytest.raises(ArtifactError, match="runs on that version or later"):
        check_loadable({"built_with": portable.to_meta()}, "10.2.0", (8, 0), "NVIDIA A100", "m")
    with pytest.raises(ArtifactError, match="lacks its build facts"):
        check_loadable({}, "10.3.0", (8, 0), "NVIDIA A100", "m")


# --- availability and selection on this machine ------------------------------------------------------

def test_tensorrt_is_a_registered_backend_whose_absence_says_why_and_how_to_install():
    backend = registry.get("tensorrt")
    assert isinstance(backend, TensorRTBackend)
    status = backend.available()
    if status.ok:
        pytest.skip(f"TensorRT {status.version} and a CUDA GPU are present")
    assert "pip install tensorrt" in status.install_hint and "NVIDIA GPU" in status.install_hint
    assert "tensorrt" in status.reason or "CUDA" in status.reason


def test_device_ready_says_no_cuda_gpu_is_present():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    node = _node(torch.relu, torch.randn(4), torch.ops.aten.relu.default)
    support = CAPABILITIES.supports(node, load("a100").primary)
    assert not support.ok and "no CUDA GPU is present" in support.reason
    assert "runs on gpu, npu devices, not cpu" in CAPABILITIES.supports(node, load("cpu-x86").primary).reason


class _FakeEngine:
    backend = "fake"

    def __call__(self, *inputs):
        return inputs


class _FakeBackend:
    name = "fake"

    def available(self):
        return Availability(True)

    def supports(self, node, device, precision=None, check_ready=True):
        return Support(True)

    def compile(self, partition, settings):
        return _FakeEngine()


def _passes(engine):
    return [OutputCheck("out", 0.0, -1.0, 1.0, True)]


def test_selection_on_a100_records_tensorrt_as_unavailable_and_falls_through(monkeypatch, tmp_path):
    if TensorRTBackend().available().ok:
        pytest.skip("TensorRT is usable here")
    graph, _ = make_partition(ConvNet().eval(), (torch.randn(2, 3, 8, 8),))
    settings = BackendSettings(load("a100").primary, threads=2, workdir=tmp_path)
    real_get = registry.get
    monkeypatch.setattr(registry, "get", lambda name: _FakeBackend() if name == "inductor" else real_get(name))
    chosen = select.select_engine(graph, settings.device.backends, "prefer", settings, _passes, 0.05, False)
    records = {r.backend: r for r in chosen.candidates}
    assert chosen.backend == "inductor" and list(records) == ["tensorrt", "inductor", "onnxruntime"]
    assert records["tensorrt"].status == "unavailable" and "pip install tensorrt" in records["tensorrt"].reason


def test_selection_on_a100_without_any_gpu_backend_names_every_reason(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    graph, _ = make_partition(ConvNet().eval(), (torch.randn(2, 3, 8, 8),))
    settings = BackendSettings(load("a100").primary, threads=2, workdir=tmp_path)
    with pytest.raises(BackendUnavailable) as info:
        select.select_engine(graph, settings.device.backends, "prefer", settings, _passes, 0.05, False)
    message = str(info.value)
    assert "tensorrt: unavailable" in message and "inductor: unsupported" in message and "onnxruntime: unsupported" in message


# --- on an NVIDIA machine with TensorRT only ---------------------------------------------------------

def test_tensorrt_engine_matches_eager_and_reloads(tmp_path):
    status = TensorRTBackend().available()
    if not status.ok:
        pytest.skip(f"needs TensorRT and a CUDA GPU: {status.reason}")
    torch.manual_seed(0)
    graph, _ = make_partition(ConvNet().eval(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: Dim("batch", min=1, max=16)}})
    settings = BackendSettings(load("h100").primary, threads=2, workdir=tmp_path)
    backend = TensorRTBackend()
    engine = backend.compile(graph, settings)
    x = torch.randn(5, 3, 8, 8)
    tol = TOLERANCE[Precision.FP32]
    for got, want in zip(engine(x), graph.gm(x)):
        if not torch.allclose(got, want, rtol=tol.rtol, atol=tol.atol):
            pytest.fail(f"the engine's output is off by {float((got - want).abs().max()):.3g}; "
                        f"{layerwise(tmp_path / 'p0.tensorrt.onnx', graph, (x,), Precision.FP32)}")
    out = tmp_path / "saved"
    out.mkdir()
    entry = engine.save(out, "p0")
    assert entry.files == ["p0.plan"] and entry.meta["built_with"]["tensorrt"] == status.version
    reloaded = backend.load(out, entry, settings)
    for a, b in zip(engine(x), reloaded(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def layerwise(onnx_path: Path, graph, inputs: tuple, precision: Precision) -> str:
    """Polygraphy's layer-by-layer comparison of TensorRT with ONNX Runtime on kiln's ONNX graph,
    for a test whose engine failed kiln's check: where the two first part."""
    try:
        from kiln.backends.tensorrt_compare import first_divergence

        tol = TOLERANCE[precision]
        feeds = [{name: x.detach().cpu().numpy() for name, x in zip(graph.input_names, inputs)}]
        found = first_divergence(onnx_path, feeds, tol.rtol, tol.atol)
    except ImportError as exc:
        return f"pip install polygraphy for a layer-by-layer comparison ({exc})"
    return found.describe() if found is not None else "Polygraphy found every layer of the graph within tolerance"
