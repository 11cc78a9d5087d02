"""The OpenVINO backend: its capability table, engines against eager at fp32, dynamic batch,
save -> load, the version check on load, and the precision it really runs at.
kiln.optimize(..., backend="openvino") on MiniLM and EfficientNet-Lite0 runs in
tests/models/test_real_models.py with the other backends."""

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from kiln.backends.openvino import OpenVinoBackend
from kiln.backends.openvino_kept import SEAL, _intact, kept_folder
from kiln.errors import ArtifactError, BackendError
from kiln.hardware_profiles import load
from kiln.types import Precision
from kiln.verify import TOLERANCE

from backends.conftest import make_partition

backend = OpenVinoBackend()
if not backend.available().ok:
    pytest.skip(backend.available().reason, allow_module_level=True)

import openvino as ov  # noqa: E402  (only once the backend is known to be here)

TOL = TOLERANCE[Precision.FP32]
aten = torch.ops.aten
CPU = load("cpu-x86").primary


def _node(target, *extra):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(target, (x, *extra))


def _assert_close(got, want, tol=TOL):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol.rtol, atol=tol.atol)


def test_openvino_reports_its_version():
    status = backend.available()
    assert status.ok and status.version.startswith(ov.get_version().split("-")[0])


@pytest.mark.parametrize("op", [aten.conv2d.default, aten.linear.default, aten.layer_norm.default,
                                aten.scaled_dot_product_attention.default, aten.gelu.default, aten.embedding.default,
                                aten.hardtanh.default, aten.mean.dim, aten.addmm.default, aten._softmax.default,
                                aten.view.default, aten._assert_tensor_metadata.default, aten.silu.default])
def test_openvino_supports_the_op_families_real_models_use(op):
    assert backend.supports(_node(op), CPU).ok


def test_openvino_names_an_op_its_frontend_cannot_convert():
    support = backend.supports(_node(aten.histc.default), CPU)
    assert not support.ok and "histc" in support.reason and "OpenVINO" in support.reason


@pytest.mark.parametrize("profile, device", [("intel-npu", "npu"), ("intel-npu", "gpu")])
def test_openvino_says_why_a_device_this_machine_lacks_is_refused(profile, device):
    spec = load(profile).devices[device]
    if any(d.startswith(device.upper()) for d in ov.Core().available_devices):
        pytest.skip(f"this machine has OpenVINO's {device.upper()} plugin")
    support = backend.supports(_node(aten.relu.default), spec)
    assert not support.ok and device.upper() in support.reason and "available_devices" in support.reason


def test_openvino_conv_engine_matches_eager_at_several_batch_sizes(convnet_partition, settings):
    graph, _ = convnet_partition
    engine = backend.compile(graph, settings)
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 8, 8)
        _assert_close(engine(x), graph.gm(x))


class TinyEncoder(nn.Module):
    """Embedding, one pre-norm attention block (SDPA with a padding mask) and an MLP."""

    def __init__(self, vocab=50, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, ids, mask):
        x = self.embed(ids)
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -1e4
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + self.out(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp(self.norm2(x))


def _encoder_inputs(batch, seq, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq // 2:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def encoder_partition():
    torch.manual_seed(0)
    return make_partition(TinyEncoder().eval(), _encoder_inputs(2, 16),
                          dynamic={"ids": {0: "batch", 1: "seq"}, "mask": {0: "batch", 1: "seq"}})[0]


def test_openvino_transformer_engine_matches_eager_with_dynamic_batch_and_sequence(encoder_partition, settings):
    engine = backend.compile(encoder_partition, settings)
    for batch, seq in ((2, 16), (1, 7), (4, 33)):
        inputs = _encoder_inputs(batch, seq, seed=batch)
        _assert_close(engine(*inputs), encoder_partition.gm(*inputs))


def test_openvino_runs_fp32_when_fp32_is_asked(encoder_partition, settings):
    # OpenVINO would pick bf16 by itself on a CPU with AVX512-BF16; kiln asks for f32 explicitly
    engine = backend.compile(encoder_partition, settings)
    assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert engine.used_precision == "f32" and "inference precision f32" in engine.summary


def test_openvino_runs_bf16_when_bf16_is_asked(encoder_partition, settings):
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 in OpenVINO's CPU plugin")
    engine = backend.compile(encoder_partition, dataclasses.replace(settings, precision=Precision.BF16))
    assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    inputs = _encoder_inputs(2, 16)
    _assert_close(engine(*inputs), encoder_partition.gm(*inputs), TOLERANCE[Precision.BF16])


def test_openvino_refuses_a_precision_it_has_no_hint_for(encoder_partition, settings):
    with pytest.raises(BackendError, match="int4"):
        backend.compile(encoder_partition, dataclasses.replace(settings, precision=Precision.INT4))


def test_openvino_feeds_the_right_tensors_when_an_input_is_unused(settings):
    class SkipsAnInput(nn.Module):
        def forward(self, x, unused, y):
            return x * 2 + y

    graph, _ = make_partition(SkipsAnInput(), (torch.randn(2, 3), torch.randn(4), torch.randn(2, 3)))
    engine = backend.compile(graph, settings)
    inputs = (torch.randn(2, 3), torch.randn(4), torch.randn(2, 3))
    _assert_close(engine(*inputs), graph.gm(*inputs))


def test_openvino_engine_saves_ir_and_loads_to_the_same_outputs(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    engine = backend.compile(graph, settings)
    out_dir = tmp_path / "saved"
    out_dir.mkdir()
    entry = engine.save(out_dir, "p0")
    assert entry.backend == "openvino" and entry.files == ["p0.xml", "p0.bin"]
    assert entry.meta["openvino"] == ov.get_version() and entry.meta["precision"] == "fp32"
    reloaded = backend.load(out_dir, entry, settings)
    assert reloaded.used_precision == "f32"
    x = torch.randn(3, 3, 8, 8)
    for a, b in zip(engine(x), reloaded(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_openvino_saved_ir_keeps_fp32_weights(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    entry = backend.compile(graph, settings).save(tmp_path, "p0")
    model = ov.Core().read_model(str(tmp_path / entry.files[0]))
    constants = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"
                 and op.get_output_element_type(0).is_real()]
    assert constants and all(op.get_output_element_type(0) == ov.Type.f32 for op in constants)


@pytest.mark.parametrize("built, refused", [("2099.1.0-1-abc", True), ("2024.0.0-1-abc", False)])
def test_openvino_load_refuses_ir_from_a_newer_openvino_only(convnet_partition, settings, tmp_path, built, refused):
    graph, _ = convnet_partition
    entry = backend.compile(graph, settings).save(tmp_path, "p0")
    entry.meta["openvino"] = built
    if refused:
        with pytest.raises(ArtifactError) as info:
            backend.load(tmp_path, entry, settings)
        assert "2099.1.0" in info.value.what and "pip install" in info.value.fix
    else:
        assert backend.load(tmp_path, entry, settings)(torch.randn(1, 3, 8, 8))


def test_openvino_load_refuses_an_engine_without_a_recorded_version(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    entry = backend.compile(graph, settings).save(tmp_path, "p0")
    del entry.meta["openvino"]
    with pytest.raises(ArtifactError, match="which OpenVINO built it"):
        backend.load(tmp_path, entry, settings)


def test_openvino_returns_a_value_the_graph_returns_twice_at_both_positions(settings):
    class ReturnsTwice(nn.Module):
        def forward(self, x):
            y = torch.log_softmax(x * 3, -1)
            return y, x + 1, y

    graph, _ = make_partition(ReturnsTwice(), (torch.randn(2, 5),))
    engine = backend.compile(graph, settings)
    x = torch.randn(2, 5)
    _assert_close(engine(x), graph.gm(x))


class ResidualGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 8)

    def forward(self, x):
        x = x * 2
        return x + self.norm(x)


def test_openvino_refuses_the_group_norm_residual_its_cpu_plugin_crashes_on():
    graph, _ = make_partition(ResidualGroupNorm().eval(), (torch.randn(2, 8, 4, 4),))
    node = next(n for n in graph.gm.graph.nodes if "group_norm" in str(n.target))
    support = backend.supports(node, CPU)
    assert not support.ok and "group_norm" in support.reason and "crashes" in support.reason


def test_openvino_takes_group_norm_without_that_residual(settings):
    graph, _ = make_partition(nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.SiLU()).eval(),
                              (torch.randn(2, 3, 8, 8),))
    assert all(backend.supports(n, CPU).ok for n in graph.gm.graph.nodes)
    x = torch.randn(2, 3, 8, 8)
    _assert_close(backend.compile(graph, settings)(x), graph.gm(x))


def test_optimize_with_openvino_builds_in_a_child_process_and_verifies():
    import kiln
    from backends.conftest import ConvNet

    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = kiln.optimize(model, "cpu-x86", (x,), backend="openvino", isolate=True, cache=False)
    assert compiled.backends == {"p0": "openvino"} and all(c["ok"] for c in compiled.report.verification)
    chosen = next(c for c in compiled.report.candidates if c.status == "chosen")
    assert "inference precision f32" in chosen.detail
    with torch.no_grad():
        want = model(x)
    _assert_close([compiled(x)[k] for k in want], list(want.values()))


class LastAxisMaxMinusBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 1))

    def forward(self, x):
        return x.amax(-1, keepdim=True) - self.bias


def test_openvino_refuses_the_last_axis_reduction_its_cpu_plugin_miscomputes():
    graph, _ = make_partition(LastAxisMaxMinusBias().eval(), (torch.randn(3, 4, 8),))
    node = next(n for n in graph.gm.graph.nodes if n.target is aten.amax.default)
    support = backend.supports(node, CPU)
    assert not support.ok and "miscomputes" in support.reason


def test_openvino_takes_a_last_axis_reduction_of_a_4d_tensor(settings):
    class Rank4(nn.Module):
        def forward(self, x):
            return x.amax(-1, keepdim=True) - torch.arange(4.0).view(1, 4, 1, 1)

    graph, _ = make_partition(Rank4(), (torch.randn(3, 4, 5, 8),))
    assert all(backend.supports(n, CPU).ok for n in graph.gm.graph.nodes)
    x = torch.randn(3, 4, 5, 8)
    _assert_close(backend.compile(graph, settings)(x), graph.gm(x))


@pytest.mark.parametrize("kernel, stride, padding, refused", [(1, 3, 1, True), (1, 2, (1, 0), True), (1, 1, 1, False),
                                                               (1, 3, 0, False), (3, 3, 1, False)])
def test_a_padded_strided_pointwise_convolution_is_refused_with_openvinos_wrong_output_size(kernel, stride, padding, refused):
    # OpenVINO 2026.4's CPU plugin strides a 1x1 convolution before padding it (fuzzing seed 364)
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding)
    graph, _ = make_partition(nn.Sequential(nn.ReLU(), conv).eval(), (torch.randn(2, 4, 9, 9),))
    node = next(n for n in graph.gm.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    support = backend.supports(node, CPU)
    assert support.ok is not refused
    if refused:
        assert "padded, strided 1x1 convolution the wrong output size" in support.reason


def test_group_norm_of_a_2d_input_is_refused_for_openvinos_missing_kernel():
    # OpenVINO 2026.4's CPU plugin cannot compile GroupNormalization of [batch, channels] (fuzzing seeds 994, 1090)
    flat, _ = make_partition(nn.GroupNorm(4, 16).eval(), (torch.randn(2, 16),))
    image, _ = make_partition(nn.GroupNorm(4, 16).eval(), (torch.randn(2, 16, 5),))
    norm = lambda graph: next(n for n in graph.gm.graph.nodes if "group_norm" in str(n.target))  # noqa: E731
    assert "no GroupNormalization kernel for a 2-d input" in backend.supports(norm(flat), CPU).reason
    assert backend.supports(norm(image), CPU).ok


def _kept_load(graph, settings, tmp_path, runtime_cache):
    """An engine saved, then loaded as the compile cache loads it: checksummed files that stay put."""
    saved = tmp_path / "saved"
    saved.mkdir(exist_ok=True)
    entry = backend.compile(graph, settings).save(saved, "p0")
    entry = dataclasses.replace(entry, sha256=tuple(hashlib.sha256((saved / f).read_bytes()).hexdigest() for f in entry.files))
    return saved, entry, dataclasses.replace(settings, runtime_cache=runtime_cache)


def _kept_folders(runtime_cache):
    return sorted(p for p in runtime_cache.iterdir() if not p.name.startswith(".tmp-")) if runtime_cache.exists() else []


def test_a_load_with_a_runtime_cache_keeps_openvino_s_blob_and_the_next_load_reads_it(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    runtime_cache = tmp_path / "entry.runtime"
    saved, entry, kept_settings = _kept_load(graph, settings, tmp_path, runtime_cache)
    first = backend.load(saved, entry, kept_settings)
    (folder,) = _kept_folders(runtime_cache)
    blobs = {b.name: b.stat().st_mtime_ns for b in folder.glob("*.blob")}
    assert blobs and (folder / SEAL).is_file()
    second = backend.load(saved, entry, kept_settings)
    assert not first.compiled.get_property("LOADED_FROM_CACHE") and second.compiled.get_property("LOADED_FROM_CACHE")
    assert {b.name: b.stat().st_mtime_ns for b in folder.glob("*.blob")} == blobs  # read, not written again
    x = torch.randn(3, 3, 8, 8)
    for a, b, c in zip(first(x), second(x), graph.gm(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=TOL.rtol, atol=TOL.atol)


@pytest.mark.parametrize("damage", ["a byte of the blob", "a file the seal does not list", "the seal"])
def test_a_kept_folder_that_does_not_match_its_seal_is_made_again_not_read(convnet_partition, settings, tmp_path, damage):
    graph, _ = convnet_partition
    runtime_cache = tmp_path / "entry.runtime"
    saved, entry, kept_settings = _kept_load(graph, settings, tmp_path, runtime_cache)
    backend.load(saved, entry, kept_settings)
    (folder,) = _kept_folders(runtime_cache)
    (blob,) = folder.glob("*.blob")
    if damage == "a byte of the blob":
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
    elif damage == "a file the seal does not list":
        (folder / "stray.blob").write_bytes(b"x")
    else:
        (folder / SEAL).unlink()
    assert not _intact(folder)
    reloaded = backend.load(saved, entry, kept_settings)
    assert not reloaded.compiled.get_property("LOADED_FROM_CACHE")
    assert _kept_folders(runtime_cache) == [folder] and _intact(folder)
    x = torch.randn(2, 3, 8, 8)
    _assert_close(reloaded(x), graph.gm(x))


def test_the_kept_folder_is_one_per_files_place_and_config():
    base = dict(root=Path("/c/e.runtime"), xml=Path("/c/e/engines/p0.xml"), checksums=("a", "b"), device="CPU",
                config={"INFERENCE_NUM_THREADS": 2})
    same = kept_folder(**base)
    assert kept_folder(**base) == same
    for change in [dict(checksums=("a", "c")), dict(xml=Path("/c/f/engines/p0.xml")), dict(config={"INFERENCE_NUM_THREADS": 1}),
                   dict(device="GPU")]:
        assert kept_folder(**{**base, **change}) != same, change


def test_a_load_without_a_runtime_cache_writes_nothing_beside_the_engine(convnet_partition, settings, tmp_path):
    graph, _ = convnet_partition
    saved, entry, _ = _kept_load(graph, settings, tmp_path, None)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    backend.load(saved, entry, settings)(torch.randn(1, 3, 8, 8))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
