"""OpenVINO backend: convert the re-exported torch.export program with OpenVINO's PyTorch
frontend, compile it for OpenVINO's CPU, GPU or NPU plugin, and save it as OpenVINO IR.

Why the ExportedProgram path: OpenVINO's `convert_model` on a live transformers module traces
the Python code again and fails on some of it (GPT-2's masking), while the program kiln has
already captured converts cleanly and needs no second ONNX export (seconds per model here).

Precision is always requested: OpenVINO picks bf16 by itself on CPUs with AVX512-BF16, so an
fp32 build sets INFERENCE_PRECISION_HINT=f32 explicitly. The saved IR keeps fp32 weights
(compress_to_fp16=False); the hint is reapplied on load, from the engine's metadata.

The capability table is OpenVINO's own: the ATen overloads its FX frontend translates (the
table its torch.compile partitioner uses, plus the ops it keeps from decomposition), and any
op its ExportedProgram path decomposes first; kiln keeps no copy of its own. Node checks add
the argument patterns OpenVINO lists but crashes on or miscomputes (found by kiln's fuzzer).

A float plan (bf16 or fp16) is built with that precision as the hint when every layer of the
partition is at it: the hint sets the precision of the whole partition (the ops around the
layers too). A float plan keeping some layers at fp32 is built under an f32 hint from a program
whose lowered layers carry their own casts (`precision.lowering.cast_layers`, as Inductor
lowers them): OpenVINO's CPU plugin runs a layer whose inputs arrive in bf16 on its bf16
kernels and the rest at f32.

Int8 plans take the ONNX road instead: kiln's one ONNX export, quantised layer by layer with
ONNX Runtime's QDQ tools exactly as the onnxruntime backend does (`onnxruntime_precision`), read
by OpenVINO's ONNX frontend. OpenVINO turns each QuantizeLinear/DequantizeLinear pair into a
FakeQuantize and its low-precision transformations run those layers on int8 kernels (VNNI);
layers the plan keeps at fp32 stay fp32. Only static int8 goes this way: dynamic quantisation's
per-call scales (DynamicQuantizeLinear) are not what OpenVINO's int8 kernels are built for.
A plan mixing int8 layers with bf16 ones, none at fp32 (precision="auto" proposes it where the
budget allows), is the same QDQ model built under the bf16 hint: the layers without QDQ nodes,
and the ops around the layers, run at bf16. On MiniLM at batch 8 its four bf16 feed-forward
layers ran 11.8 ms where at fp32 they ran 22.5 (the 33 int8 layers: 22 ms).
A plan with every layer int8 is built under the f32 hint, and on a CPU whose plugin runs bf16
also under the bf16 hint, where the ops around the int8 layers (attention's activation MatMuls,
softmax, norms, residual adds) run at bf16. The bf16 build is kept when, on the example inputs,
it adds at most SURROUNDINGS_SHARE of the budget's allowance to the f32 build's error and runs
faster here, timed interleaved (GPT-2 b1: 34.8 ms against 37.4); verification then checks it
against the budget like any build.

Conversion calls the frontend directly rather than ov.convert_model, which would send usage
telemetry on the user's behalf. The engine always runs the saved IR (compile and load build
it the same way), and load refuses IR written by a newer OpenVINO than the installed one:
OpenVINO reads IR from its own and older releases, not necessarily from newer ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import operator
import queue
import re
import time
import warnings
from pathlib import Path
from typing import ClassVar

import torch
from torch.fx import Node

from kiln.backends.base import (Availability, BackendBase, BackendSettings, CapabilityTable, EngineEntry, Support, export_partition,
                                place_engine_file)
from kiln.backends.openvino_kept import compile_keeping, kept_folder
from kiln.ir import PartitionGraph
from kiln.errors import ArtifactError, BackendError, BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.frontend.capture import export_program
from kiln.precision.lowering import FLOAT_TYPES, cast_layers
from kiln.ir import SCHEME_PRECISION, Scheme
from kiln.timing import time_engines
from kiln.types import DeviceKind, Precision
from kiln.verify import worst_per_example

INSTALL_HINT = "pip install openvino"
# kiln device kind -> OpenVINO plugin name
OV_DEVICES: dict[DeviceKind, str] = {DeviceKind.CPU: "CPU", DeviceKind.GPU: "GPU", DeviceKind.NPU: "NPU"}
# kiln precision -> (INFERENCE_PRECISION_HINT value, the plugin's OPTIMIZATION_CAPABILITIES entry)
PRECISION_HINTS: dict[Precision, tuple[str, str]] = {
    Precision.FP32: ("f32", "FP32"),
    Precision.BF16: ("bf16", "BF16"),
    Precision.FP16: ("f16", "FP16"),
    Precision.INT8: ("f32", "INT8"),  # int8 comes from the model's QDQ nodes; the rest runs fp32
}
# Layer schemes the inference precision hint expresses when a plan puts every layer at one of them
FLOAT_SCHEMES = frozenset({Scheme.BF16, Scheme.FP16})
# An all-int8 plan's ops around its layers at bf16 (see the module docstring): the share of the
# budget's allowance they may add to the f32 build's error on the example inputs, how much faster
# the bf16 build must run to be kept (less is a tie, which goes to f32), and the timing's budget.
SURROUNDINGS_SHARE = 0.1
SURROUNDINGS_LEAD = 0.03
SURROUNDINGS_SECONDS = 0.5
# Export-time shape and dtype assertions: OpenVINO's decoder skips them (its types are static).
_METADATA_OPS = frozenset({"aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
                           "aten.sym_constrain_range_for_size.default"})


def _device_ready(device: DeviceSpec) -> str | None:
    plugin = OV_DEVICES.get(device.kind)
    if plugin is None:
        return f"OpenVINO has no plugin for {device.kind.value} devices"
    try:
        here = _available_devices()
    except ImportError:
        return f"openvino is not installed ({INSTALL_HINT})"
    if not any(d.split(".")[0] == plugin for d in here):
        return (f"device {device.name} needs OpenVINO's {plugin} plugin, but this machine offers only "
                f"{', '.join(here) or 'no devices'} (ov.Core().available_devices)")
    return None


@functools.cache
def _available_devices() -> tuple[str, ...]:
    import openvino as ov

    return tuple(ov.Core().available_devices)


@functools.cache
def _capabilities(device: str) -> tuple[str, ...]:
    """The plugin's OPTIMIZATION_CAPABILITIES (precisions it runs), fixed for the process."""
    import openvino as ov

    return tuple(ov.Core().get_property(device, "OPTIMIZATION_CAPABILITIES"))


def _op_key(target: torch._ops.OpOverload) -> str:
    # "aten::add.Tensor" in torch's naming -> "aten.add.Tensor", the FX frontend's naming
    return target.name().replace("::", ".") + ("" if "." in target.name() else ".default")


@functools.cache
def _frontend_ops() -> frozenset[str]:
    """ATen overloads OpenVINO's FX frontend translates directly, as OpenVINO lists them."""
    from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose
    from openvino.frontend.pytorch.torchdynamo.op_support import OperatorSupport

    listed = {name.removeprefix("torch.ops.") for name in OperatorSupport(None)._support_dict}
    kept = {_op_key(op) for op in ops_to_not_decompose() if isinstance(op, torch._ops.OpOverload)}
    return frozenset(listed | kept | _METADATA_OPS)


@functools.cache
def _decomposed_ops() -> frozenset[str]:
    """Ops OpenVINO's ExportedProgram path decomposes to core ATen before translating."""
    from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose

    keep = set(ops_to_not_decompose())
    return frozenset(_op_key(op) for op in torch.export.default_decompositions()
                     if isinstance(op, torch._ops.OpOverload) and op not in keep)


def _rank4_sdpa(node: Node) -> str | None:
    query = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], Node) else None
    if query is not None and query.dim() < 3:
        return f"OpenVINO's scaled_dot_product_attention needs a query of rank 3 or more, not {query.dim()}"
    return None


def _residual_around_group_norm(node: Node) -> str | None:
    """OpenVINO 2026.4's CPU plugin crashes (SIGSEGV in compile_model) on GroupNormalization of a
    computed tensor whose output is added to or multiplied by that same tensor (found by kiln's
    fuzzer: x = y * w; x + group_norm(x)). Refused until a release is known to fix it."""
    source = node.args[0] if node.args else None
    if not isinstance(source, Node) or source.op == "placeholder":
        return None
    outputs = [node, *(u for u in node.users if u.target is operator.getitem and u.args[1] == 0)]
    for user in (u for out in outputs for u in out.users):
        if user.target in _ADD_OR_MUL and source in user.args:
            return ("OpenVINO's CPU plugin crashes compiling group_norm whose output is added to or multiplied by "
                    "its own computed input (OpenVINO 2026.4)")
    return None


_ADD_OR_MUL = frozenset({torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.mul.Tensor,
                         torch.ops.aten.mul_.Tensor})


def _group_norm_openvino_runs(node: Node) -> str | None:
    """GroupNormalization that OpenVINO 2026.4's CPU plugin can compile: it has no kernel for a
    2-d input ([batch, channels]; 'Cannot fallback on ngraph reference implementation', with or
    without a dynamic batch; reproduced with openvino.convert_model alone, found by kiln's
    fuzzer), and it crashes on the residual pattern `_residual_around_group_norm` names."""
    value = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], Node) else None
    if isinstance(value, torch.Tensor) and value.dim() < 3:
        return f"OpenVINO's CPU plugin has no GroupNormalization kernel for a {value.dim()}-d input (OpenVINO 2026.4)"
    return _residual_around_group_norm(node)

def _last_axis_reduction_into_constant(node: Node) -> str | None:
    """OpenVINO 2026.4's CPU plugin computes a wrong result for a rank-3 reduction over the last
    axis with keepdim whose output meets a constant in add/sub/mul/div (it fuses the constant as
    a per-channel post-op with the wrong stride when the batch is over 1; found by kiln's fuzzer).
    Rank 4 and non-constant operands are unaffected."""
    value = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], Node) else None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if value is None or value.dim() != 3 or not keepdim or dims is None:
        return None
    if [d % 3 for d in ([dims] if isinstance(dims, int) else dims)] != [2]:
        return None
    for user in node.users:
        if user.target in _ELEMENTWISE and any(isinstance(a, Node) and a.op == "get_attr" for a in user.args):
            return (f"OpenVINO's CPU plugin miscomputes {node.target} over the last axis of a 3-d tensor followed by "
                    f"{user.target} with a constant (OpenVINO 2026.4)")
    return None


_ELEMENTWISE = frozenset({torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.mul.Tensor,
                          torch.ops.aten.div.Tensor})

def _padded_strided_pointwise_conv(node: Node) -> str | None:
    """OpenVINO 2026.4's CPU plugin moves a 1x1 convolution's stride into a slice ahead of the
    convolution, before the padding, when an element-wise op feeds it and the input shape is
    static: Conv1d(k=1, stride=3, padding=1) after a division gave length 3 for eager's 2
    (reproduced with openvino.convert_model and a static reshape, no kiln; found by fuzzing)."""
    weight = node.args[1].meta.get("val") if len(node.args) > 1 and isinstance(node.args[1], Node) else None
    if weight is None or weight.dim() < 3 or any(size != 1 for size in weight.shape[2:]):
        return None
    transposed = node.target is torch.ops.aten.convolution.default and len(node.args) > 6 and node.args[6]
    stride = node.args[3] if len(node.args) > 3 else 1
    padding = node.args[4] if len(node.args) > 4 else 0
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
    if transposed or not any(s != 1 for s in as_list(stride)) or isinstance(padding, str) \
            or not any(p != 0 for p in as_list(padding)):
        return None
    return ("OpenVINO's CPU plugin gives a padded, strided 1x1 convolution the wrong output size "
            "(it strides before padding; measured on OpenVINO 2026.4)")


# Conversions OpenVINO lists but fails on for some arguments or neighbours (crashes, wrong results).
_NODE_CHECKS = {"aten.scaled_dot_product_attention.default": _rank4_sdpa,
                **{name: _padded_strided_pointwise_conv for name in (
                    "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default")},
                "aten.group_norm.default": _group_norm_openvino_runs,
                "aten.native_group_norm.default": _group_norm_openvino_runs,
                **{name: _last_axis_reduction_into_constant for name in (
                    "aten.amax.default", "aten.amin.default", "aten.sum.dim_IntList", "aten.mean.dim", "aten.prod.dim_int")}}


def frontend_supports(node: Node) -> Support:
    """Whether OpenVINO's PyTorch frontend converts `node` (its op table, read on first use)."""
    if node.op != "call_function":
        return Support(True)
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return Support(True)  # operator.getitem and friends are tuple plumbing the decoder follows
    key = _op_key(target)
    if (check := _NODE_CHECKS.get(key)) is not None and (reason := check(node)) is not None:
        return Support(False, reason)
    if key in _frontend_ops() or key in _decomposed_ops() \
            or torch._C._dispatch_has_kernel_for_dispatch_key(target.name(), "CompositeImplicitAutograd"):
        return Support(True)
    return Support(False, f"OpenVINO's PyTorch frontend has no conversion for {target}")


# Float precisions through the inference precision hint, int8 from QDQ nodes; on every plugin.
CAPABILITIES = CapabilityTable(
    "openvino",
    {kind: frozenset(PRECISION_HINTS) for kind in DeviceKind},
    coverage=frontend_supports,
    device_ready=lambda device: _device_ready(device),
    # int8 layers beside bf16 ones: QDQ ONNX under the bf16 hint (_int8_float_mix); measured on CPU only
    mixes={DeviceKind.CPU: frozenset({frozenset({Precision.INT8, Precision.BF16})})},
)


@contextlib.contextmanager
def _quiet():
    """The frontend warns about deprecated pytree calls and logs, with tracebacks, each op it
    meant to keep from decomposition that this torch does not decompose anyway; neither is news
    to kiln's user. The filter applies only during the call."""
    root = logging.getLogger()
    not_decomp_notes = lambda record: "not found in decomp table" not in record.getMessage()  # noqa: E731
    root.addFilter(not_decomp_notes)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(not_decomp_notes)


def _version_tuple(text: str) -> tuple[int, ...]:
    # "2026.4.1-22982-e213a147257-releases/2026/4" -> (2026, 4, 1)
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in match.groups(default="0")) if match else ()


def _installed_version() -> str:
    import openvino as ov

    return ov.get_version()


@dataclasses.dataclass(frozen=True)
class Wiring:
    """How a partition's flat inputs and outputs map onto the OpenVINO model's ports."""

    inputs: tuple[int, ...]  # per OpenVINO input, its position among the partition's inputs
    outputs: tuple[int, ...]  # per partition output, the OpenVINO output holding it


class OpenVinoEngine:
    backend = "openvino"

    def __init__(self, model, xml_path: Path, settings: BackendSettings, precision: Precision, device: str,
                 wiring: Wiring, hint: Precision | None = None, checksums: tuple[str, ...] = ()):
        """`hint`: the inference precision OpenVINO is given, `precision` unless the plan's
        layers carry their own casts (then f32: the casts say which layers run lower).
        `model` None: compiled from `xml_path` through the blob kept in settings.runtime_cache
        for files with these `checksums` (kiln.backends.openvino_kept)."""
        import openvino as ov

        self.xml_path = xml_path
        self.wiring = wiring
        self.precision = precision
        self.hint = precision if hint is None else hint
        self.device = device
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[self.hint][0], "PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":  # the thread budget is a CPU plugin property
            config["INFERENCE_NUM_THREADS"] = settings.threads
        try:
            if model is None:
                folder = kept_folder(settings.runtime_cache, xml_path, checksums, device, config)
                self.compiled = compile_keeping(ov.Core(), xml_path, device, config, folder)
            else:
                self.compiled = ov.Core().compile_model(model, device, config)
        except Exception as exc:
            raise BackendError(f"OpenVINO could not compile the model for {device}: {str(exc).splitlines()[0][:300]}",
                               where=str(xml_path), fix="try backend='onnxruntime', or report the model") from exc
        self.used_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32"
        self.runtime_ops = len(self.compiled.get_runtime_model().get_ordered_ops())
        # An InferRequest serves one call at a time: each call borrows an idle one (or makes one),
        # so threads calling the same engine never share a request's buffers.
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._idle.put(self.compiled.create_infer_request())
        self.summary = ""

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # share_inputs: OpenVINO reads the tensors' memory in place; share_outputs=False: each
            # call's outputs are its own arrays, never views a later call overwrites.
            results = request.infer([_to_numpy(inputs[i]) for i in self.wiring.inputs], share_inputs=True,
                                    share_outputs=False)
            outputs = [torch.from_numpy(results[i]) for i in range(len(self.compiled.outputs))]
            return tuple(outputs[i] for i in self.wiring.outputs)
        finally:
            self._idle.put(request)

    def meta(self) -> dict:
        return {"openvino": _installed_version(), "device": self.device, "precision": self.precision.value,
                "hint": self.hint.value, "inference_precision": self.used_precision, "runtime_ops": self.runtime_ops,
                "inputs": list(self.wiring.inputs), "outputs": list(self.wiring.outputs)}

    def save(self, directory: Path, stem: str) -> EngineEntry:
        xml, binary = directory / f"{stem}.xml", directory / f"{stem}.bin"
        place_engine_file(self.xml_path, xml)
        place_engine_file(self.xml_path.with_suffix(".bin"), binary)
        return EngineEntry(self.backend, [xml.name, binary.name], {**self.meta(), "summary": self.summary})


def _to_numpy(tensor: torch.Tensor):
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor.numpy()


def _convert(exported: torch.export.ExportedProgram):
    """What ov.convert_model does for an ExportedProgram, without its usage telemetry (which it
    sends unless the user opted out): decode with the FX decoder, convert with the PyTorch
    frontend, then the same MOC graph cleanups. The model's constants may point into the
    program's tensors, so it is only saved, never compiled (see compile)."""
    from openvino._offline_transformations import apply_moc_transformations, compress_quantize_weights_transformation
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder

    frontend = FrontEndManager().load_by_framework("pytorch")
    decoder = TorchFXPythonDecoder.from_exported_program(exported)  # must outlive convert(): C++ calls back into it
    model = frontend.convert(frontend.load(decoder))
    apply_moc_transformations(model, cf=False, smart_reshape=True)
    compress_quantize_weights_transformation(model)
    return model


def _float_hint_covers(partition: PartitionGraph) -> bool:
    """Whether OpenVINO's inference precision hint expresses the partition's plan exactly
    enough: every layer at one float scheme (bf16 or fp16), none kept at fp32. The hint sets
    the precision of the whole partition, so the ops around the layers (softmax, norms) run as
    OpenVINO chooses for that precision, not at kiln's fp32 rule; verification checks the
    outputs at the float precision's tolerance."""
    layers = partition.precision.layers
    return bool(layers) and len({layer.scheme for layer in layers}) == 1 and layers[0].scheme in FLOAT_SCHEMES


def _float_layers_only(partition: PartitionGraph) -> bool:
    """Whether the plan lowers layers to one float scheme only (some layers may stay fp32):
    OpenVINO runs it from layer-by-layer casts under an f32 hint."""
    schemes = partition.precision.schemes()
    return len(schemes) == 1 and next(iter(schemes)) in FLOAT_SCHEMES


def _int8_float_mix(partition: PartitionGraph) -> Scheme | None:
    """The float scheme of a plan mixing static int8 layers with layers at that float scheme and
    none at fp32, else None. OpenVINO builds it as an int8 plan under the float scheme's hint:
    the hint runs every layer without QDQ nodes (and the ops around the layers) at that scheme."""
    layers = partition.precision.layers
    schemes = {layer.scheme for layer in layers}
    floats = schemes & FLOAT_SCHEMES
    return next(iter(floats)) if len(floats) == 1 and schemes == {Scheme.INT8_STATIC, *floats} else None


def _quantised_onnx(partition: PartitionGraph, settings: BackendSettings):
    """(OpenVINO model, its input names, lowering summary) for a partition with a static int8
    plan, or one mixing static int8 with a float scheme (_int8_float_mix): kiln's ONNX export with
    ONNX Runtime's QDQ nodes on the plan's int8 layers."""
    import openvino as ov

    from kiln.backends import onnxruntime_precision
    from kiln.backends.onnxruntime import export_onnx

    schemes = partition.precision.schemes()
    if (mix := _int8_float_mix(partition)) is not None:  # the float layers stay float in the ONNX; the hint lowers them
        layers = [layer.at_fp32("lowered by the inference hint") if layer.scheme == mix else layer
                  for layer in partition.precision.layers]
        partition = dataclasses.replace(partition, precision=dataclasses.replace(partition.precision, layers=layers))
        schemes = partition.precision.schemes()
    elif schemes & FLOAT_SCHEMES:
        raise BackendError(f"kiln's OpenVINO backend mixes static int8 with one float scheme only when no layer stays fp32 "
                           f"(its inference hint lowers every layer int8 leaves); this plan mixes "
                           f"{', '.join(sorted(schemes))} with fp32 layers",
                           where=f"partition {partition.name}", fix="request one precision")
    if schemes != {Scheme.INT8_STATIC}:
        raise BackendError(f"kiln's OpenVINO backend lowers static int8 plans, not {', '.join(sorted(schemes))}",
                           where=f"partition {partition.name}", fix="use backend='onnxruntime' for this precision")
    path = settings.workdir / f"{partition.name}.openvino.qdq.onnx"
    program = export_onnx(partition, path)
    lowering = onnxruntime_precision.lower(path, partition, program)
    try:
        with _quiet():
            model = ov.Core().read_model(str(path))
    except Exception as exc:
        raise BackendError(f"OpenVINO's ONNX frontend failed on the quantised model: {_first_line(exc)}",
                           where=f"partition {partition.name}", fix="try backend='onnxruntime'") from exc
    return model, list(partition.input_names), lowering


def _all_int8(partition: PartitionGraph) -> bool:
    """Whether the plan puts every layer at static int8: none kept at fp32, whose ops a bf16
    hint would lower too."""
    layers = partition.precision.layers
    return bool(layers) and all(layer.scheme == Scheme.INT8_STATIC for layer in layers)


def _int8_surroundings(engine: OpenVinoEngine, partition: PartitionGraph, settings: BackendSettings) -> tuple[OpenVinoEngine, str]:
    """`engine` (an all-int8 plan under the f32 hint), or the same IR under the bf16 hint where
    that holds the budget and runs faster here (module docstring); with what was decided."""
    import openvino as ov

    if engine.device != "CPU" or settings.budget is None or "BF16" not in _capabilities(engine.device):
        return engine, "ops around the int8 layers at f32"
    candidate = OpenVinoEngine(ov.Core().read_model(str(engine.xml_path)), engine.xml_path, settings, engine.precision,
                               engine.device, engine.wiring, Precision.BF16)
    inputs = tuple(partition.example_inputs)
    with torch.no_grad():
        want = [t for t in torch.utils._pytree.tree_leaves(partition.gm(*inputs)) if isinstance(t, torch.Tensor)]
    f32_error, bf16_error = (_worst_error(built(*inputs), want) for built in (engine, candidate))
    if not _adds_little(settings.budget, f32_error, bf16_error):
        return engine, (f"ops around the int8 layers at f32 (at bf16: cosine {bf16_error[0]:.6f}, rel. error "
                        f"{bf16_error[1]:.3g}, against {f32_error[0]:.6f}, {f32_error[1]:.3g})")
    f32_s, bf16_s = time_engines([engine, candidate], inputs, SURROUNDINGS_SECONDS).medians()
    timed = f"{bf16_s * 1e3:.2f} ms a call at bf16, {f32_s * 1e3:.2f} at f32"
    if bf16_s < f32_s * (1 - SURROUNDINGS_LEAD):
        return candidate, f"ops around the int8 layers at bf16 ({timed})"
    return engine, f"ops around the int8 layers at f32 ({timed})"


def _worst_error(got: tuple[torch.Tensor, ...], want: list[torch.Tensor]) -> tuple[float, float]:
    """(worst cosine, worst relative error) over the floating outputs, per example."""
    cosine, rel = 1.0, 0.0
    for g, w in zip(got, want):
        if w.is_floating_point():
            c, r = worst_per_example(g, w)
            cosine, rel = min(cosine, c), max(rel, r)
    return cosine, rel


def _adds_little(budget, f32_error: tuple[float, float], bf16_error: tuple[float, float]) -> bool:
    """Whether the bf16 build adds at most SURROUNDINGS_SHARE of each of `budget`'s allowances
    to the f32 build's error (both measured against the partition's graph, run eagerly with the
    plan's rounded weights); the builder's verification then holds the kept build to the budget."""
    (f32_cos, f32_rel), (cos, rel) = f32_error, bf16_error
    if budget.min_cosine is not None and (f32_cos - cos) > SURROUNDINGS_SHARE * (1 - budget.min_cosine):
        return False
    return budget.max_rel_error is None or rel - f32_rel <= SURROUNDINGS_SHARE * budget.max_rel_error


def _distinct_outputs(partition: PartitionGraph) -> tuple[PartitionGraph, tuple[int, ...]]:
    """OpenVINO's frontend fails on a graph that returns one value twice, so it gets a graph
    returning each value once (sharing the weights) and the engine maps outputs back."""
    output = next(n for n in partition.gm.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else None
    if values is None or len(set(values)) == len(values):
        return partition, tuple(range(len(partition.output_names)))
    distinct = list(dict.fromkeys(values))
    graph, copies = torch.fx.Graph(), {}
    graph.graph_copy(partition.gm.graph, copies)
    graph.output(tuple(copies[v] for v in distinct))
    names = tuple(partition.output_names[values.index(v)] for v in distinct)
    narrowed = dataclasses.replace(partition, gm=torch.fx.GraphModule(partition.gm, graph), output_names=names)
    return narrowed, tuple(distinct.index(v) for v in values)


def _set_shapes_and_names(model, partition: PartitionGraph, placeholders: list[str],
                          used: list[str] | None = None) -> tuple[int, ...]:
    """Name inputs and outputs as kiln does, and give each input its partial shape: the example's
    sizes, with the partition's dynamic dims as bounded ranges (OpenVINO would otherwise leave
    every dim unbounded, and its CPU plugin plans memory better for bounded or static dims).
    Returns, per OpenVINO input, its position among the partition's inputs: the frontend drops
    inputs the graph never reads."""
    import openvino as ov

    positions = [placeholders.index(port.get_any_name()) if port.get_any_name() in placeholders else -1
                 for port in model.inputs]
    if -1 in positions:
        positions = _match_unnamed(model, positions, partition, placeholders, used or [])
    if -1 in positions or len(model.outputs) != len(partition.output_names):
        raise BackendError(f"OpenVINO's model has inputs {[p.get_any_name() for p in model.inputs]} and "
                           f"{len(model.outputs)} outputs; the partition has inputs {placeholders} and "
                           f"{len(partition.output_names)} outputs", where=f"partition {partition.name}",
                           fix="try backend='onnxruntime', or report the model")
    dynamic = partition.dynamic_shapes or (None,) * len(partition.input_names)
    shapes = {}
    for port, position in zip(model.inputs, positions):
        port.get_tensor().set_names({partition.input_names[position]})
        sizes = [ov.Dimension(size) for size in partition.example_inputs[position].shape]
        for axis, dim in (dynamic[position] or {}).items():
            sizes[axis] = ov.Dimension(max(int(dim.min or 0), 0), int(dim.max))
        shapes[port] = ov.PartialShape(sizes)
    model.reshape(shapes)
    for port, name in zip(model.outputs, partition.output_names):
        port.get_tensor().set_names({name})
    return tuple(positions)


def _match_unnamed(model, positions: list[int], partition: PartitionGraph, placeholders: list[str],
                   used: list[str]) -> list[int]:
    """The frontend names an input by a number now and then, keeping an unread input beside it
    (fuzzing seed 1460: ['tensors_1', '14'] for inputs 0 and 1 unread, 2 read). Each unnamed input
    goes to the one read, unmatched partition input of its rank; left -1 where that is not one."""
    taken = {p for p in positions if p >= 0}
    for index, port in enumerate(model.inputs):
        if positions[index] >= 0:
            continue
        rank = port.get_partial_shape().rank
        fits = [placeholders.index(name) for name in used if placeholders.index(name) not in taken
                and rank.is_static and partition.example_inputs[placeholders.index(name)].dim() == rank.get_length()]
        if len(fits) == 1:
            positions[index] = fits[0]
            taken.add(fits[0])
    return positions


class OpenVinoBackend(BackendBase):
    name: ClassVar[str] = "openvino"
    build_modules: ClassVar[tuple[str, ...]] = ("openvino", "openvino.frontend.pytorch.fx_decoder")
    capabilities: ClassVar[CapabilityTable] = CAPABILITIES
    keeps_compiled: ClassVar[bool] = True

    def available(self) -> Availability:
        try:
            import openvino as ov
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed", INSTALL_HINT)
        return Availability(True, version=ov.get_version())

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> OpenVinoEngine:
        self._require()
        import openvino as ov

        device = self._device(settings)
        original = partition
        partition, output_map = _distinct_outputs(partition)
        start = time.perf_counter()
        hint = None
        by_hint = not partition.precision.lowered or _float_hint_covers(partition)
        by_casts = False
        if not by_hint and not _float_layers_only(partition):
            model, placeholders, lowering = _quantised_onnx(partition, settings)
            used = None
            if (mix := _int8_float_mix(partition)) is not None:
                hint = SCHEME_PRECISION[mix]
                lowering += f"; {len(partition.precision.by_scheme(mix))} layers at {mix} by the inference hint"
        else:
            if by_hint:
                exported = export_partition(partition)
            else:  # some layers stay fp32: each lowered layer carries its own casts, the rest runs at f32
                (scheme,) = partition.precision.schemes()
                names = {layer.node for layer in partition.precision.lowered}
                gm = cast_layers(partition.gm, names, FLOAT_TYPES[scheme])
                exported = export_program(gm, partition.example_inputs, partition.dynamic_shapes)
                hint, by_casts = Precision.FP32, True
            try:
                with _quiet():
                    model = _convert(exported)
            except Exception as exc:
                raise BackendError(f"OpenVINO's PyTorch frontend failed: {_first_line(exc)}",
                                   where=f"partition {partition.name}", fix="try backend='onnxruntime'") from exc
            placeholders = list(exported.graph_signature.user_inputs)
            used = [n.name for n in exported.graph.nodes if n.op == "placeholder" and n.name in placeholders and n.users]
            lowering = (f"{len(partition.precision.lowered)} layers cast to {partition.precision.lowest().value}, "
                        f"{len(partition.precision.layers) - len(partition.precision.lowered)} at fp32") if by_casts else ""
        wiring = Wiring(_set_shapes_and_names(model, partition, placeholders, used), output_map)
        convert_s = time.perf_counter() - start
        xml = settings.workdir / f"{partition.name}.openvino.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)  # fp32 weights stay fp32 in the IR
        del model  # its constants may view the program's tensors; the engine runs the saved IR, as a reload would
        engine = OpenVinoEngine(ov.Core().read_model(str(xml)), xml, settings, settings.precision, device, wiring, hint)
        if not by_hint and not by_casts and _all_int8(partition):  # its surroundings at f32 or bf16
            engine, surroundings = _int8_surroundings(engine, original, settings)
            lowering += f"; {surroundings}"
        source = (f"torch.export ({lowering})" if by_casts else f"QDQ ONNX ({lowering})" if lowering else "torch.export")
        engine.summary = (f"OpenVINO {_installed_version().split('-')[0]} {device}: inference precision {engine.used_precision}, "
                          f"{engine.runtime_ops} runtime ops, converted from {source} in {convert_s:.1f} s")
        return engine

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> OpenVinoEngine:
        self._require()
        import openvino as ov

        xml = directory / entry.files[0]
        _check_readable(entry, xml)
        device = entry.meta.get("device", "CPU")
        # Every OpenVINO build has its CPU plugin; listing the devices loads and probes every
        # other plugin (tens of ms), so only an engine for another device asks.
        if device != "CPU" and device not in {d.split(".")[0] for d in _available_devices()}:
            raise BackendError(f"the engine was built for OpenVINO's {device} plugin, which this machine lacks "
                               f"(it offers {', '.join(_available_devices())})", where=str(xml),
                               fix="load it on a machine with that device, or rebuild the artifact for this one")
        precision = Precision(entry.meta.get("precision", Precision.FP32.value))
        hint = Precision(entry.meta.get("hint", precision.value))
        # through a kept blob where the files stay put and their checksums were checked
        keeping = settings.runtime_cache is not None and len(entry.sha256) == len(entry.files)
        model = None if keeping else ov.Core().read_model(str(xml))
        try:
            wiring = Wiring(tuple(int(i) for i in entry.meta["inputs"]), tuple(int(i) for i in entry.meta["outputs"]))
        except (KeyError, TypeError, ValueError):
            raise ArtifactError("the OpenVINO engine's metadata lacks its input and output wiring", where=str(xml),
                                fix="rebuild the artifact with this kiln") from None
        engine = OpenVinoEngine(model, xml, settings, precision, device, wiring, hint, entry.sha256)
        engine.summary = entry.meta.get("summary", "")
        return engine

    def _device(self, settings: BackendSettings) -> str:
        if (reason := _device_ready(settings.device)) is not None:
            raise BackendUnavailable(f"OpenVINO cannot build for {settings.device.name}: {reason}",
                                     fix="choose a profile whose device this machine has")
        device = OV_DEVICES[settings.device.kind]
        if settings.precision not in PRECISION_HINTS:
            raise BackendError(f"kiln's OpenVINO backend builds {', '.join(p.value for p in PRECISION_HINTS)}, "
                               f"not {settings.precision.value}", where=f"device {settings.device.name}",
                               fix="choose another precision or backend")
        capabilities = _capabilities(device)
        if PRECISION_HINTS[settings.precision][1] not in capabilities:
            raise BackendError(f"OpenVINO's {device} plugin does not run {settings.precision.value} here "
                               f"(it offers {', '.join(capabilities)})", where=f"device {settings.device.name}",
                               fix="choose a precision the device runs")
        return device

    def _require(self) -> None:
        status = self.available()
        if not status.ok:
            raise BackendUnavailable(f"OpenVINO backend unavailable: {status.reason}", fix=status.install_hint)


def _check_readable(entry: EngineEntry, xml: Path) -> None:
    """OpenVINO reads IR written by its own or an older release, not necessarily IR from a newer
    one (new opsets and op versions). So a build by a newer release than the one installed is
    refused; an older or equal one loads."""
    built = str(entry.meta.get("openvino", ""))
    here = _installed_version()
    if not built:
        raise ArtifactError("the OpenVINO engine's metadata does not say which OpenVINO built it", where=str(xml),
                            fix="rebuild the artifact with this kiln")
    if _version_tuple(built) > _version_tuple(here):
        raise ArtifactError(f"the OpenVINO engine was built with OpenVINO {built.split('-')[0]}, newer than the "
                            f"installed {here.split('-')[0]}, which may not read its IR", where=str(xml),
                            fix=f"pip install 'openvino>={built.split('-')[0]}', or rebuild the artifact here")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"
