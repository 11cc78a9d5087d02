import re
import zipfile

import pytest
import torch

from kiln.backends.base import BackendSettings
from kiln.backends.inductor import InductorBackend, count_kernels, lower_for
from kiln.errors import BackendUnavailable
from kiln.hardware_profiles import load
from kiln.types import Precision
from kiln.verify import TOLERANCE, compare
from tests.backends.conftest import ConvNet, make_partition

backend = InductorBackend()
if not backend.available().ok:
    pytest.skip(backend.available().reason, allow_module_level=True)

TOL = TOLERANCE[Precision.FP32]


def test_inductor_takes_every_aten_op_on_cpu_at_float_precisions():
    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.kthvalue.default, (graph.placeholder("x"), 1))
    assert backend.supports(node, load("cpu-x86").primary).ok


def test_inductor_engine_runs_saves_and_loads_to_the_same_outputs(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    engine = backend.compile(graph, settings)
    kernels = re.search(r"(\d+) generated kernels", engine.summary)
    assert kernels and int(kernels.group(1)) >= 1, engine.summary
    x = torch.randn(4, 3, 8, 8)
    for got, want in zip(engine(x), graph.gm(x)):
        torch.testing.assert_close(got, want, rtol=TOL.rtol, atol=TOL.atol)
    out_dir = tmp_path / "saved"
    out_dir.mkdir()
    entry = engine.save(out_dir, "p0")
    assert entry.files == ["p0.pt2"] and entry.meta["device"] == "cpu" and entry.meta["kernels"] == int(kernels.group(1))
    reloaded = backend.load(out_dir, entry, settings)
    assert reloaded.summary == engine.summary
    for a, b in zip(engine(x), reloaded(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kernel_count_reads_distinct_cpp_and_triton_kernel_names_from_the_package(tmp_path):
    package = tmp_path / "m.pt2"
    with zipfile.ZipFile(package, "w") as archive:
        archive.writestr("m/data/aotinductor/model/abc.wrapper.cpp",
                         'loadKernel("x.cubin", "triton_poi_fused_add_0"); triton_poi_fused_add_0(...);\n'
                         'loadKernel("y.cubin", "triton_red_fused_sum_1"); triton_per_fused_softmax_2(...);')
        archive.writestr("m/data/aotinductor/model/abc.kernel.cpp", 'extern "C" void cpp_fused_relu_0(float* p)')
        archive.writestr("m/data/aotinductor/model/abc.wrapper.so", b"\0")
    assert count_kernels(package) == 4
    empty = tmp_path / "empty.pt2"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("m/data/aotinductor/model/abc.wrapper.so", b"\0")
    assert count_kernels(empty) is None


class _Casts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ConvNet()

    def forward(self, x):
        logits = self.net(x)["logits"]
        return logits * torch.arange(5, dtype=torch.float32, device=x.device) + logits.to(torch.float32)


def test_lowering_to_bf16_casts_weights_factories_and_casts_and_stays_within_bf16_tolerance():
    torch.manual_seed(0)
    graph, _ = make_partition(_Casts().eval(), (torch.randn(2, 3, 8, 8),), dynamic={"x": {0: "batch"}})
    lowered = lower_for(graph.gm, torch.device("cpu"), torch.bfloat16)
    assert all(p.dtype is torch.bfloat16 for p in lowered.parameters())
    assert all(p.dtype is torch.float32 for p in graph.gm.parameters())  # the partition is untouched
    targets = [n.target for n in lowered.graph.nodes]
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert "torch.float32" not in lowered.code
    x = torch.randn(3, 3, 8, 8)
    got = [t.float() for t in lowered(x.bfloat16())]
    checks = compare(graph.output_names, got, list(graph.gm(x)), Precision.BF16)
    assert all(c.ok for c in checks), checks


def test_inductor_refuses_a_gpu_device_without_cuda_and_says_so(convnet_partition, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    graph, _ = convnet_partition
    a100 = load("a100").primary
    node = next(n for n in graph.gm.graph.nodes if n.op == "call_function")
    support = backend.supports(node, a100)
    assert not support.ok and "no CUDA GPU is present" in support.reason
    with pytest.raises(BackendUnavailable, match="no CUDA GPU is present"):
        backend.compile(graph, BackendSettings(a100, threads=2, workdir=tmp_path))


def test_pt2e_int8_quantises_the_planned_layer_on_kiln_grid_even_when_re_export_renumbers_it():
    import dataclasses

    pytest.importorskip("torchao")
    from kiln.backends.inductor_precision import lowered_program
    from kiln.ir import LayerPlan, PrecisionPlan, Scheme
    from kiln.precision.lowering import with_lowered_weights
    from kiln.precision.schemes import per_channel_int8
    from tests.backends.test_onnxruntime_precision import _renumbered_partition, _weight_of

    partition, (first, second, third) = _renumbered_partition()  # named linear_9, linear, linear_1
    plan = PrecisionPlan([LayerPlan(second.name, "linear", _weight_of(second), Scheme.INT8_STATIC, input_range=(-4.0, 4.0))])
    partition = dataclasses.replace(partition, precision=plan, calibration=(partition.example_inputs,))
    program, summary = lowered_program(with_lowered_weights(partition))
    assert summary == "int8-static: 1 layers"
    module = program.module()
    int8_weights = [value for value in [*module.parameters(), *module.buffers()] if value.dtype == torch.int8]
    assert len(int8_weights) == 1
    weights = dict(partition.gm.named_parameters())
    for layer in (first, second):  # a and b have the same shape; only b's integers match
        w = weights[_weight_of(layer)].detach()
        expected = torch.round(per_channel_int8(w) / (w.abs().amax(dim=1, keepdim=True) / 127)).to(torch.int8)
        assert torch.equal(int8_weights[0], expected) == (layer is second)
