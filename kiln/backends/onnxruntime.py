"""ONNX Runtime backend: export through torch.onnx (dynamo exporter) from the captured
program, run in an InferenceSession with ORT's full graph optimisation.

Session options come from the build settings (intra-op threads, ORT_ENABLE_ALL), with the
worker threads' spinning bounded (INTRA_OP_SPIN_US) so that they leave the cores to what runs
next. The CPU execution provider runs here; CUDA and TensorRT providers are requested first when the
installed onnxruntime offers them and the partition targets a GPU. The capability table is
the ONNX exporter's own registry of ATen overloads (plus ops it decomposes first), so kiln's
coverage answer is the exporter's, not a hand-kept copy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib.util
import io
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import ClassVar, Mapping

import torch
from torch.fx import Node

from kiln.backends.onnxruntime_precision import lower as lower_precision
from kiln.backends.base import (Availability, BackendBase, BackendSettings, CapabilityTable, EngineEntry, OpSupport, Support, export_partition,
                                place_engine_file)
from kiln.ir import PartitionGraph, Scheme
from kiln.errors import BackendError, BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.types import DeviceKind, Precision
from kiln.verify import compare

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# How long ONNX Runtime's intra-op threads spin for more work before they sleep. Left to ORT,
# they keep spinning after a call returns and take the cores from whatever runs next (another
# partition's engine, the user's own code): PyTorch matmuls right after a MiniLM or
# EfficientNet-Lite0 call ran at 2.8x their time alone, at 1.2x with spinning bounded to 200 us
# (bench/ort_spinning.py). ORT's own call keeps its speed under the bound; spinning turned off
# entirely cost it 1.2-1.9x on a 2-core CPU.
INTRA_OP_SPIN_US = 200


@dataclasses.dataclass(frozen=True)
class NpuProvider:
    """The ONNX Runtime execution provider that drives one family of NPUs."""

    keyword: str  # matched, lower case, against the profile device's `model`
    provider: str
    options: Mapping[str, object]
    install: str


# NPU families ONNX Runtime reaches through an execution provider; the first keyword found in a
# device's model name picks the row. Nodes the provider cannot take run on ORT's CPU provider.
NPU_PROVIDERS: tuple[NpuProvider, ...] = (
    NpuProvider("intel", "OpenVINOExecutionProvider", {"device_type": "NPU"}, "pip install onnxruntime-openvino"),
    NpuProvider("ascend", "CANNExecutionProvider", {}, "install an onnxruntime build with the CANN execution provider"),
    NpuProvider("qualcomm", "QNNExecutionProvider", {"backend_path": "libQnnHtp.so"}, "pip install onnxruntime-qnn"),
    NpuProvider("hexagon", "QNNExecutionProvider", {"backend_path": "libQnnHtp.so"}, "pip install onnxruntime-qnn"),
    NpuProvider("deep learning accelerator", "TensorrtExecutionProvider", {"trt_dla_enable": True, "trt_dla_core": 0},
                "install onnxruntime-gpu built with TensorRT (JetPack's onnxruntime wheel)"),
    NpuProvider("ryzen ai", "VitisAIExecutionProvider", {}, "install AMD's Ryzen AI onnxruntime build"),
)


def npu_provider(device: DeviceSpec) -> NpuProvider | None:
    model = device.model.lower()
    return next((row for row in NPU_PROVIDERS if row.keyword in model), None)


OPSET = 20


def exporter_supports(node: Node) -> Support:
    """Whether kiln's ONNX export converts `node`: the exporter's registry, the ops it
    decomposes first, and the arguments it is known to fail on. Backends that start from the
    exported ONNX (ONNX Runtime, TensorRT) share this answer."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return Support(True)  # operator.getitem and friends export as tuple plumbing
    if (check := _NODE_CHECKS.get(target)) is not None and (reason := check(node)) is not None:
        return Support(False, reason)
    if _converts(target):
        return Support(True)
    if (functional := _functional_form(target)) is not None and _converts(functional):
        # export functionalises an in-place op on an intermediate value (a residual `x += y`);
        # writing into a model input or a weight has no ONNX form
        written = node.args[0] if node.args else None
        if isinstance(written, Node) and written.op in ("placeholder", "get_attr"):
            return Support(False, f"{target} writes into {'an input' if written.op == 'placeholder' else 'a weight'} "
                                  f"({written.name}) in place, which ONNX cannot express")
        return Support(True)
    return Support(False, f"the ONNX exporter has no conversion for {target}")


def _converts(target) -> bool:
    return (target in _METADATA_CHECKS or _exporter_registry().is_registered(target) or target in _decompositions()
            or torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd"))


def _functional_form(target):
    """aten.add_.Tensor -> aten.add.Tensor (None when `target` is not an in-place variant)."""
    name = target._schema.name.split("::")[-1]
    if not (target._schema.is_mutable and name.endswith("_") and not name.endswith("__")):
        return None
    packet = getattr(torch.ops.aten, name[:-1], None)
    return getattr(packet, target._overloadname, None) if packet is not None else None


def _rank4_query(node: Node) -> str | None:
    query = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if query is not None and query.dim() != 4:
        return f"the ONNX exporter converts scaled_dot_product_attention only with 4-d query/key/value, not {query.dim()}-d"
    return None


def _tensor_first_operand(node: Node) -> str | None:
    if not isinstance(node.args[0], Node):
        return f"the ONNX exporter cannot convert {node.target} with a Python number as its first operand"
    return None


# Conversions the exporter registers but fails on for some arguments (found by kiln's fuzzer).
_NODE_CHECKS = {
    torch.ops.aten.scaled_dot_product_attention.default: _rank4_query,
    torch.ops.aten.mul.Tensor: _tensor_first_operand,
}


# Export-time shape and dtype assertions: the exporter drops them (ONNX has static types).
_METADATA_CHECKS = frozenset({torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
                              torch.ops.aten.sym_constrain_range_for_size.default})


@functools.cache
def _exporter_registry():
    from torch.onnx._internal.exporter import _registration

    with _quiet_exporter():
        return _registration.ONNXRegistry.from_torchlib()


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per torchvision op when torchvision is absent and prints its
    optimizer's progress; neither is news to kiln's user. Filters apply only during the call."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    no_torchvision = lambda record: "torchvision" not in record.getMessage()  # noqa: E731
    rewriter_log = logging.getLogger("onnxscript")  # constant-folding attempts it abandons, at WARNING
    errors_only = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    registry_log.addFilter(no_torchvision)
    for handler_owner in (rewriter_log, *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("onnxscript."))):
        handler_owner.addFilter(errors_only)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registry_log.removeFilter(no_torchvision)
        for name in ["onnxscript", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("onnxscript."))]:
            logging.getLogger(name).removeFilter(errors_only)


@functools.cache
def _decompositions():
    # The exporter decomposes to core ATen before converting, so these need no own conversion.
    return frozenset(torch.export.default_decompositions())


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, model_path: Path, settings: BackendSettings, output_names: tuple[str, ...],
                 optimized_path: Path | None = None, disabled_optimizers: tuple[str, ...] = ()):
        import onnxruntime as ort

        self.model_path = model_path
        self.output_names = output_names
        self.disabled_optimizers = tuple(disabled_optimizers)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
        if INTRA_OP_SPIN_US is not None:
            options.add_session_config_entry("session.intra_op.spin_duration_us", str(INTRA_OP_SPIN_US))
        providers = [p for p in _providers_for(settings.device) if p[0] in ort.get_available_providers()]
        if optimized_path is not None:  # the graph ORT really runs, after its own fusions
            options.optimized_model_filepath = str(optimized_path)
            options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                             optimized_path.name + ".data")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers or [("CPUExecutionProvider", {})],
                                                disabled_optimizers=list(self.disabled_optimizers))
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not load the exported model: {exc}", where=str(model_path),
                               fix="try backend='inductor', or report the model") from exc
        self.providers = tuple(self.session.get_providers())
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.summary = ""

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: t.detach().contiguous().numpy() for name, t in zip(self.input_names, inputs)}
        outputs = self.session.run(None, feeds)
        return tuple(torch.from_numpy(o) for o in outputs)

    def save(self, directory: Path, stem: str) -> EngineEntry:
        target = directory / f"{stem}.onnx"
        place_engine_file(self.model_path, target)
        extra = [p for p in self.model_path.parent.glob(self.model_path.name + ".data")]
        files = [target.name]
        for data in extra:  # external weights of models over 2 GB keep their file name
            place_engine_file(data, directory / data.name)
            files.append(data.name)
        meta = {"providers": list(self.providers), "opset": OPSET, "summary": self.summary}
        if self.disabled_optimizers:  # part of the engine: the loaded session must run the same graph
            meta["disabled_optimizers"] = list(self.disabled_optimizers)
        return EngineEntry(self.backend, files, meta)


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already, or blocked (None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _innermost_reason(exc: BaseException) -> str:
    """The exporter wraps the real error in several layers with long help texts; the last
    cause in the chain names the op and the problem."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


def export_onnx(partition: PartitionGraph, path: Path | None):
    """kiln's one ONNX export: the partition re-exported through torch.export, converted by the
    dynamo exporter at OPSET with the partition's input/output names, saved unfused at `path`
    when one is given (weights over 2 GB go to a `.data` file beside it). Returns the exporter's
    ONNXProgram, whose `exported_program` links each ONNX node back to the partition's fx nodes."""
    exported = export_partition(partition)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(exported, (), dynamo=True, opset_version=OPSET,
                                        input_names=list(partition.input_names),
                                        output_names=list(partition.output_names), verbose=False)
    except Exception as exc:
        raise BackendError(f"the ONNX exporter failed: {_innermost_reason(exc)}",
                           where=f"partition {partition.name}", fix="try backend='inductor'") from exc
    if path is not None:
        program.save(str(path))
    return program


def _save_with_external_weights(model, path: Path) -> None:
    """Save an ONNX model with its weights in `<name>.data` beside it. ONNX Runtime maps that
    file instead of parsing the weights out of one protobuf: a session over BERT-base's 436 MB
    opened in 0.25 s instead of 0.70 s, at every build and every load of the artifact."""
    import onnx_ir

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx_ir appends to an existing data file
    onnx_ir.save(model, str(path), external_data=data.name)


# What kiln changes in ORT's fusions on the CPU execution provider, each for a measured reason
# (ORT 1.32 on Zen 4, 2 threads, batch 8 x 128 tokens, interleaved timings in one process).
# Fused contrib ops kiln spells back out after onnxscript's rules: their CPU kernel is slower than the ops they replace.
CPU_SPELLED_OUT = {
    "SkipLayerNormalization": "its fp32 CPU kernel took 10.4 ms vs 1.2 ms for Add + LayerNormalization at hidden 768",
}
# ORT graph optimizers kiln turns off in fused CPU sessions.
CPU_DISABLED_OPTIMIZERS = {
    "SkipLayerNormFusion": "it would fuse the residual Add + LayerNormalization back into SkipLayerNormalization",
    "MatMulAddFusion": "a rank-3 MatMul + bias Add left as is ran GPT-2's 2304/3072-wide layers faster than its "
                       "Reshape-Gemm-Reshape form, and leaves the bias to FastGelu (GPT-2 b8: 710 vs 732 ms)",
}

# ORT graph optimizers kiln turns off in CPU sessions of static int8 (QDQ) plans.
CPU_DISABLED_FOR_QDQ = {
    "MatMulAddFusion": "it rewrites DequantizeLinear -> rank-3 MatMul + bias Add into Reshape-Gemm-Reshape before the QDQ "
                       "fusions run, and no integer kernel takes that form: a transformer's int8 layers then ran float Gemm "
                       "on weights dequantised every call (two FFN layers at hidden 768, 128 tokens: 168 ms; left off, ORT "
                       "fuses MatMulIntegerToFloat and ran them in 37 ms, timed on a loaded machine)",
}


def _fuse_for_ort(program, path: Path, cpu: bool) -> str:
    """Rewrite the exported graph into ORT's fused contrib ops (attention, skip layer norm,
    bias-GELU, ...) with onnxscript's ORT fusion rules, then save it to `path`. On the CPU
    execution provider the ops in CPU_SPELLED_OUT are undone. If the rewriter fails, the
    unfused graph is saved and the summary says why."""
    try:
        from onnxscript.rewriter import ort_fusions

        with _quiet_exporter():
            model, counts = ort_fusions.optimize_for_ort(program.model)
            undone = _spell_out_skip_layer_norm(model) if cpu else 0
    except Exception as exc:  # the unfused graph is still correct; the report says what happened
        _save_with_external_weights(program.model, path)
        return f"ORT fusion rules failed ({type(exc).__name__}); unfused graph used"
    _save_with_external_weights(model, path)
    if undone:
        counts = {**counts, "skip_layer_normalization": counts.get("skip_layer_normalization", 0) - undone}
    fused = ", ".join(f"{name} {n}" for name, n in counts.items() if n)
    summary = f"kiln's ORT fusion rules applied: {fused}" if fused else "no kiln ORT fusion rule applied"
    if undone:
        summary += (f"; {undone} SkipLayerNormalization kept as Add + LayerNormalization on the CPU provider "
                    f"({CPU_SPELLED_OUT['SkipLayerNormalization']})")
    return summary


def _fusion_changed_answers(engine: OnnxRuntimeEngine, partition: PartitionGraph) -> str | None:
    """Where the fused engine's outputs on the example inputs differ from the partition's graph
    run eagerly (a shape, or values past the fp32 tolerance); None when they agree. A wrong
    rewrite costs a rebuild from the unfused graph here instead of the candidate."""
    with torch.no_grad():
        want = [x for x in partition.gm(*partition.example_inputs)]
    checks = compare(partition.output_names, list(engine(*partition.example_inputs)), want, Precision.FP32)
    failed = [c for c in checks if not c.ok]
    return "; ".join(f"output {c.name!r}: {c.detail or f'max abs error {c.max_abs_error:.3g}'}" for c in failed) or None


def _spell_out_skip_layer_norm(model) -> int:
    """SkipLayerNormalization(x, skip, γ, β, bias) -> LayerNormalization(x + bias + skip, γ, β) in
    the top-level graph, keeping its sum output; nodes whose mean/inverse-std outputs are read
    stay fused. Returns how many were spelled out."""
    import onnx_ir as ir

    graph, count = model.graph, 0
    for node in [n for n in graph if n.op_type == "SkipLayerNormalization" and n.domain == "com.microsoft"]:
        outputs = [*node.outputs, None, None, None][:4]
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in outputs[1:3]):
            continue
        x, skip, gamma, beta, bias = [*node.inputs, None, None, None][:5]
        new_nodes = []
        if bias is not None:
            new_nodes.append(ir.node("Add", [x, bias], name=f"{node.name}_bias"))
            x = new_nodes[-1].outputs[0]
        new_nodes.append(ir.node("Add", [x, skip], name=f"{node.name}_add"))
        total = new_nodes[-1].outputs[0]
        epsilon = node.attributes.get_float("epsilon", 1e-12)
        new_nodes.append(ir.node("LayerNormalization", [total, gamma] + ([beta] if beta is not None else []),
                                 {"axis": -1, "epsilon": epsilon}, name=f"{node.name}_norm"))
        for made in new_nodes:
            made.outputs[0].name = f"{made.name}_out"
        kept = [(old, made) for old, made in ((outputs[0], new_nodes[-1].outputs[0]), (outputs[3], total)) if old is not None]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old for old, _ in kept],
                                                [made for _, made in kept])
        count += 1
    return count


# Ops that exist only as fusions (ORT contrib ops and kiln-visible fused forms); the report
# counts them in the graph ORT actually runs.
FUSED_OP_TYPES = frozenset({
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "QuickGelu", "BiasAdd",
    "FusedMatMul", "FusedConv", "FusedGemm", "Gemm", "EmbedLayerNormalization", "RotaryEmbedding", "MatMulNBits",
    "NhwcFusedConv", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearConv", "QLinearMatMul",
})


def _runtime_graph_summary(optimized: Path) -> str:
    """'ORT runs 120 nodes: Attention 6, SkipLayerNormalization 12, ...' from the optimized graph
    ORT wrote at session creation; the files are removed afterwards (they are not the engine)."""
    import collections

    import onnx

    try:
        graph = onnx.load(str(optimized), load_external_data=False).graph
    except Exception as exc:  # the count is information, never a reason to fail the build
        return f"ORT's optimized graph could not be read ({type(exc).__name__})"
    finally:
        for leftover in (optimized, optimized.with_name(optimized.name + ".data")):
            leftover.unlink(missing_ok=True)
    counts = collections.Counter(n.op_type for n in graph.node)
    fused = ", ".join(f"{op} {n}" for op, n in counts.most_common() if op in FUSED_OP_TYPES)
    return f"ORT runs {len(graph.node)} nodes" + (f": {fused}" if fused else "")


def _spell_out_rms_norm(partition: PartitionGraph) -> PartitionGraph:
    """x·rsqrt(mean(x², -1) + ε)·w for each float32 aten.rms_norm. The exporter (opset 20)
    decomposes rms_norm with positive ReduceMean axes, which onnxscript's SimplifiedLayer-
    Normalization rule (axes [-1]) does not match; spelled out over negative dims it fuses."""
    aten = torch.ops.aten

    def float32_rms_norm(node: Node) -> bool:
        value = node.args[0].meta.get("val") if node.target is aten.rms_norm.default else None
        return isinstance(value, torch.Tensor) and value.dtype == torch.float32  # half types upcast inside

    if not any(float32_rms_norm(n) for n in partition.gm.graph.nodes):
        return partition
    gm = copy.deepcopy(partition.gm)
    graph = gm.graph
    for node in [n for n in graph.nodes if float32_rms_norm(n)]:
        x, shape, weight, eps = [*node.args, None, None][:4]
        eps = torch.finfo(torch.float32).eps if eps is None else eps  # rms_norm's default
        with graph.inserting_before(node):
            square = graph.call_function(aten.pow.Tensor_Scalar, (x, 2))
            mean = graph.call_function(aten.mean.dim, (square, list(range(-len(shape), 0)), True))
            scale = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (mean, eps)),))
            out = graph.call_function(aten.mul.Tensor, (x, scale))
            if weight is not None:
                out = graph.call_function(aten.mul.Tensor, (out, weight))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    gm.recompile()
    return dataclasses.replace(partition, gm=gm)


def _device_ready(device: DeviceSpec) -> str | None:
    if device.kind is DeviceKind.CPU:
        return None
    import onnxruntime as ort

    if device.kind is DeviceKind.GPU and not set(GPU_PROVIDERS) & set(ort.get_available_providers()):
        return f"device {device.name} is a GPU and this onnxruntime has no CUDA or TensorRT provider (pip install onnxruntime-gpu)"
    if device.kind is DeviceKind.NPU:
        row = npu_provider(device)
        if row is None:
            return (f"device {device.name} ({device.model}) is an NPU no ONNX Runtime execution provider in kiln's table "
                    f"drives ({', '.join(sorted({r.provider for r in NPU_PROVIDERS}))})")
        if row.provider not in ort.get_available_providers():
            return (f"device {device.name} ({device.model}) needs ONNX Runtime's {row.provider}, which this onnxruntime "
                    f"lacks ({row.install})")
    return None


def _providers_for(device: DeviceSpec) -> list[tuple[str, dict]]:
    """(provider, options) in ORT's order of preference; the CPU provider takes what the others refuse."""
    if device.kind is DeviceKind.GPU:
        return [*((p, {}) for p in GPU_PROVIDERS), ("CPUExecutionProvider", {})]
    if device.kind is DeviceKind.NPU and (row := npu_provider(device)) is not None:
        return [(row.provider, dict(row.options)), ("CPUExecutionProvider", {})]
    return [("CPUExecutionProvider", {})]


# Op coverage is the exporter's registry (exporter_supports). Precisions are what runs *fast*:
# the CPU provider has int8 (QDQ static, dynamic; VNNI kernels) and int4 weight-only
# (MatMulNBits, linear layers only) but no bf16 kernels and few fp16 ones (an fp16 graph runs as
# casts around fp32 kernels), so neither is offered there; GPU providers add fp16. An NPU's
# execution provider takes the fp32 graph and applies its own precision.
_ALL_BUT_INT4 = frozenset(Precision) - {Precision.INT4}
CAPABILITIES = CapabilityTable(
    "onnxruntime",
    {DeviceKind.CPU: frozenset({Precision.FP32, Precision.INT8, Precision.INT4}),
     DeviceKind.GPU: frozenset({Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4}),
     DeviceKind.NPU: frozenset({Precision.FP32})},
    ops={torch.ops.aten.linear.default: OpSupport(frozenset(Precision))},
    default=OpSupport(_ALL_BUT_INT4),
    coverage=lambda node: exporter_supports(node),  # looked up at call time: tests may patch it
    device_ready=lambda device: _device_ready(device),
)


class OnnxRuntimeBackend(BackendBase):
    name: ClassVar[str] = "onnxruntime"
    build_modules: ClassVar[tuple[str, ...]] = ("onnx", "onnx_ir", "onnxscript", "onnxscript.rewriter.ort_fusions",
                                                "torch.onnx", "onnxruntime")
    capabilities: ClassVar[CapabilityTable] = CAPABILITIES

    def available(self) -> Availability:
        try:
            import onnxruntime
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed", "pip install onnxruntime onnx onnxscript")
        # The exporter's packages are looked up, not imported: importing onnxscript alone took
        # 0.17 s, a third of a compile-cache hit, which only runs an engine.
        for name in ("onnx", "onnxscript"):  # the dynamo exporter needs both
            if not _installed(name):
                return Availability(False, f"{name} is not installed", "pip install onnxruntime onnx onnxscript")
        return Availability(True, version=onnxruntime.__version__)

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> OnnxRuntimeEngine:
        self._require()
        path = settings.workdir / f"{partition.name}.onnx"
        exported = _spell_out_rms_norm(partition)
        optimized = settings.workdir / f"{partition.name}.ort-optimized.onnx"
        if partition.precision.lowered:
            # ORT's quantisation tools match plain MatMul/Gemm/Conv nodes, so they run on the
            # unfused graph; the session's own optimizer then fuses around the Q/DQ nodes.
            program = export_onnx(exported, path)
            try:
                lowered = lower_precision(path, partition, program)
            except BackendError:
                raise
            except Exception as exc:  # the tools raise plain exceptions; name them as this backend's failure
                raise BackendError(f"ONNX Runtime quantisation failed: {type(exc).__name__}: {str(exc)[:300]}",
                                   where=f"partition {partition.name}", fix="try backend='inductor' or precision='fp32'") from exc
            # no fp32 fallback here: it would not be the plan
            qdq = settings.device.kind is DeviceKind.CPU and Scheme.INT8_STATIC in partition.precision.schemes()
            engine = OnnxRuntimeEngine(path, settings, partition.output_names, optimized,
                                       tuple(CPU_DISABLED_FOR_QDQ) if qdq else ())
            engine.summary = f"{_runtime_graph_summary(optimized)}; {lowered}" + (
                f"; ORT optimizers off on the CPU provider: {', '.join(CPU_DISABLED_FOR_QDQ)}" if qdq else "")
            return engine
        cpu = settings.device.kind is DeviceKind.CPU
        disabled: tuple[str, ...] = ()
        program = export_onnx(exported, None)  # saved below, fused or not, with its weights beside it
        if settings.fuse:
            rules = _fuse_for_ort(program, path, cpu)
            disabled = tuple(CPU_DISABLED_OPTIMIZERS) if cpu else ()
        else:
            _save_with_external_weights(program.model, path)
            rules = "kiln's ORT fusion rules not applied (fusion=False)"
        # A fused contrib op may have no kernel on this execution provider (GroupNorm on CPU), or a
        # rewrite may be wrong (onnxscript 0.7.2's mha2 rule dropped the reshape after an attention
        # whose result is also a model output): the unfused graph is still correct, and the report
        # says why it was used. The rules rewrite the exported graph in place, so that case exports
        # again: it is rare, and every other build saves writing an unused file.
        refused = None
        try:
            engine = OnnxRuntimeEngine(path, settings, partition.output_names, optimized, disabled)
        except BackendError as exc:
            refused = f"fused graph refused by ONNX Runtime ({exc.what.split(': ', 1)[-1][:160]})"
        else:
            if disabled:
                rules += f"; ORT optimizers off on the CPU provider: {', '.join(disabled)}"
            if settings.fuse and (changed := _fusion_changed_answers(engine, partition)) is not None:
                refused = f"kiln's ORT fusion rules changed the graph's answer ({changed[:200]})"
        if refused is not None:
            _save_with_external_weights(export_onnx(exported, None).model, path)
            engine = OnnxRuntimeEngine(path, settings, partition.output_names, optimized)
            rules = f"{refused}; unfused graph used"
        engine.summary = f"{_runtime_graph_summary(optimized)}; {rules}"
        return engine

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> OnnxRuntimeEngine:
        self._require()
        return OnnxRuntimeEngine(directory / entry.files[0], settings, tuple(entry.meta.get("output_names", ())),
                                 disabled_optimizers=tuple(entry.meta.get("disabled_optimizers", ())))

    def _require(self) -> None:
        status = self.available()
        if not status.ok:
            raise BackendUnavailable(f"ONNX Runtime backend unavailable: {status.reason}", fix=status.install_hint)
