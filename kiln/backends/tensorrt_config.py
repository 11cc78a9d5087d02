"""The TensorRT backend's decisions, as plain data and pure functions that need no TensorRT.

Everything here runs (and is tested) on a CPU-only machine; `kiln/backends/tensorrt.py`
replays these decisions against TensorRT's builder and runtime.

- `derive_build_config`: profile device + precision plan + TensorRT major -> `TrtBuildConfig`
  (workspace, strong typing, the builder flags both majors have, sparse weights, optimization
  profiles, timing cache, hardware/version compatibility), refusing with a reason what
  TensorRT would not honour (fp8 off Hopper, int8 with no scales, a major kiln does not know).
  Per-layer precision is not a builder setting: it is in the ONNX graph (`tensorrt_precision`).
- `TORCH_DTYPE` / `DATATYPE_PRECISION` / `TRT_DATATYPE`: every trt.DataType to torch and kiln
  and back, refusing the types torch cannot hold (`torch_dtype`, `trt_datatype`).
- `optimization_profiles`: min/opt/max per input from the partition's dynamic dims.
- `onnx_node_owners` / `layer_precisions`: which fx node each ONNX node came from, so parser
  refusals name kiln's nodes and the report names the ONNX nodes at each precision.
- `TRT_RESTRICTIONS` + `trt_supports`: ATen ops the ONNX parser rejects or TensorRT runs
  differently (documented in onnx-tensorrt's operator matrix for TensorRT 10 and in the
  TensorRT limits), and `parser_failures`: the parser's own refusals at build time.
- `EngineFacts` + `incompatibility`: what an engine was built with and whether this install
  can run it (TensorRT version and major, GPU compute capability, compatibility levels).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch.fx import GraphModule, Node

from kiln.backends.base import Support
from kiln.backends.tensorrt_api import (BUILDER_FLAGS, HARDWARE_COMPATIBILITY, INSTALL, NETWORK_FLAGS, SUPPORTED_MAJORS,
                                        major_of)
from kiln.errors import BackendError, BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.ir import DECISION_META
from kiln.types import DeviceKind, NodeDecision, Precision

# Precisions TensorRT computes in, as trt.DataType member names (TF32 is FLOAT math on tensor cores).
TRT_DATATYPE: dict[Precision, str] = {Precision.FP32: "FLOAT", Precision.TF32: "FLOAT", Precision.FP16: "HALF",
                                      Precision.BF16: "BF16", Precision.INT8: "INT8", Precision.FP8: "FP8",
                                      Precision.INT4: "INT4"}
# ... and back: the kiln precision of each trt.DataType, None for types that are not a layer's
# compute precision in kiln (integer I/O, FP4 and E8M0, which kiln never plans).
DATATYPE_PRECISION: dict[str, Precision | None] = {
    "FLOAT": Precision.FP32, "HALF": Precision.FP16, "BF16": Precision.BF16, "INT8": Precision.INT8,
    "FP8": Precision.FP8, "INT4": Precision.INT4, "INT32": None, "INT64": None, "BOOL": None, "UINT8": None,
    "FP4": None, "E8M0": None}
# trt.DataType -> the torch dtype kiln's runner allocates an engine's input/output in. torch holds
# INT4 and FP4 only packed two to a byte (or not at all), so an engine with such an I/O tensor
# is refused (`torch_dtype`); inside an engine they are TensorRT's business.
TORCH_DTYPE: dict[str, torch.dtype | None] = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8, "INT32": torch.int32,
    "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8, "FP8": torch.float8_e4m3fn,
    "E8M0": getattr(torch, "float8_e8m0fnu", None),  # torch 2.7+
    "INT4": None, "FP4": None}
TRT_OF_TORCH: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPE.items() if dtype is not None}
# Weak typing survives in one place: TensorRT 10 compiles DLA engines from precision flags
# (strongly typed DLA networks arrived with TensorRT 11.4.1); these are the flags it takes.
DLA_PRECISION_FLAG: dict[Precision, str] = {Precision.FP16: "FP16", Precision.INT8: "INT8"}
FLOAT_LAYER_PRECISIONS = frozenset({Precision.FP32, Precision.FP16, Precision.BF16})
# Quantized types: TensorRT takes their scales from Q/DQ nodes in the graph.
QUANTIZED = frozenset({Precision.INT8, Precision.FP8, Precision.INT4})
# Share of device memory TensorRT may use as build/run scratch: weights, activations and other
# processes need the rest; a unified-memory SoC (Jetson) also shares it with the CPU.
WORKSPACE_SHARE = 0.25
WORKSPACE_SHARE_UNIFIED = 0.125
MAX_RANK = 8  # nvinfer1::Dims::MAX_DIMS
MAX_TOPK = 3840  # onnx-tensorrt operator matrix (TensorRT 10): TopK `K` must be less than 3840


def torch_dtype(datatype: str, tensor: str, where: str) -> torch.dtype:
    """The torch dtype for an engine I/O tensor of trt.DataType `datatype`; BackendError for a
    type torch cannot hold unpacked."""
    if datatype not in TORCH_DTYPE:
        raise BackendError(f"engine tensor {tensor} has TensorRT type {datatype}, which kiln does not know", where=where,
                           fix="upgrade kiln, or rebuild the engine with float or integer inputs and outputs")
    dtype = TORCH_DTYPE[datatype]
    if dtype is None:
        raise BackendError(f"engine tensor {tensor} is {datatype}, which torch cannot hold as a tensor of its own "
                           f"(kiln runs TensorRT engines on torch tensors)", where=where,
                           fix="keep int4/fp4 inside the engine: quantize weights, not the model's inputs and outputs")
    return dtype


def trt_datatype(dtype: torch.dtype, where: str) -> str:
    """The trt.DataType member name for a torch dtype; BackendError for one TensorRT has no type for."""
    if dtype not in TRT_OF_TORCH:
        raise BackendError(f"TensorRT has no type for {dtype}", where=where,
                           fix="cast the tensor to float32 (float64), int32 (int16) or another TensorRT type, or use "
                               "another backend")
    return TRT_OF_TORCH[dtype]


@dataclass(frozen=True)
class ShapeProfile:
    """One input's shapes for a TensorRT optimization profile."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class PrecisionPlan:
    """What the partition's ONNX graph carries: its precision (the lowest any layer runs at), the
    ONNX nodes the graph's own types put at another precision (casts, Q/DQ), and the facts that
    decide whether quantized types are possible. A strongly typed build takes every layer's
    precision from the graph; nothing here becomes a per-layer builder setting."""

    precision: Precision = Precision.FP32
    layer_precisions: Mapping[str, Precision] = field(default_factory=dict)  # ONNX node name -> precision
    explicit_quantization: bool = False  # the ONNX graph holds QuantizeLinear/DequantizeLinear
    sparse_layers: tuple[str, ...] = ()  # fx nodes whose weights are 2:4 structured sparse

    @property
    def requested(self) -> frozenset[Precision]:
        return frozenset({self.precision, *self.layer_precisions.values()})


@dataclass(frozen=True)
class TrtBuildConfig:
    """Every builder setting kiln passes to TensorRT, with the reason for each in `notes`."""

    device: str
    workspace_bytes: int
    flags: frozenset[str]  # trt.BuilderFlag members to set
    cleared_flags: frozenset[str]  # trt.BuilderFlag members TensorRT sets by default that kiln clears
    strongly_typed: bool
    # ONNX node name -> the precision the graph's types give it (recorded for the report; with
    # strong typing TensorRT reads it from the graph, no layer is pinned by the builder)
    layer_precisions: Mapping[str, Precision]
    profiles: tuple[ShapeProfile, ...]
    timing_cache: Path
    hardware_compatibility: str = "NONE"
    version_compatible: bool = False
    dla_core: int | None = None
    trt_major: int = 11
    network_flags: frozenset[str] = frozenset()  # trt.NetworkDefinitionCreationFlag members to pass
    notes: tuple[str, ...] = ()

    def to_meta(self) -> dict:
        return {"device": self.device, "workspace_bytes": self.workspace_bytes, "flags": sorted(self.flags),
                "cleared_flags": sorted(self.cleared_flags), "strongly_typed": self.strongly_typed,
                "layer_precisions": {k: v.value for k, v in sorted(self.layer_precisions.items())},
                "profiles": [{"input": p.input, "min": list(p.min), "opt": list(p.opt), "max": list(p.max)} for p in self.profiles],
                "hardware_compatibility": self.hardware_compatibility, "version_compatible": self.version_compatible,
                "dla_core": self.dla_core, "tensorrt_major": self.trt_major, "network_flags": sorted(self.network_flags),
                "notes": list(self.notes)}


def workspace_bytes(device: DeviceSpec) -> int:
    share = WORKSPACE_SHARE_UNIFIED if "unified_memory" in device.features else WORKSPACE_SHARE
    return int(device.memory_gb * share * (1 << 30))


def is_dla(device: DeviceSpec) -> bool:
    return device.kind is DeviceKind.NPU and any(f.startswith("nvdla") for f in device.features)


def derive_build_config(device: DeviceSpec, plan: PrecisionPlan, profiles: Sequence[ShapeProfile], engine_path: Path,
                        trt_major: int = 11, hardware_compatibility: str = "NONE",
                        version_compatible: bool = False) -> TrtBuildConfig:
    """The builder settings for `plan` on `device` with TensorRT `trt_major`; raises BackendError
    for a plan TensorRT cannot honour there (kiln never lets TensorRT silently run another
    precision), BackendUnavailable for a TensorRT major kiln does not build with.

    Every network is strongly typed (the only kind TensorRT 11 builds; opt-in on 10, whose
    weak-typing flags are deprecated since 10.12): the ONNX graph carries each layer's precision
    as casts and Q/DQ nodes (`tensorrt_precision`), so the flags are the ones both majors have.
    The exception is a DLA on TensorRT 10, whose compiler takes precision flags only."""
    where = f"device {device.name} ({device.model})"
    if trt_major not in SUPPORTED_MAJORS:
        raise BackendUnavailable(f"TensorRT {trt_major}.x is installed; kiln builds with TensorRT "
                                 f"{' and '.join(map(str, SUPPORTED_MAJORS))} only", where=where, fix=INSTALL)
    _check_precisions(device, plan, where)
    if hardware_compatibility not in HARDWARE_COMPATIBILITY:
        raise BackendError(f"unknown hardware compatibility level {hardware_compatibility!r}", where=where,
                           fix=f"use one of {', '.join(HARDWARE_COMPATIBILITY)}")
    notes: list[str] = []
    requested = plan.requested
    strongly_typed = not (is_dla(device) and trt_major < 11)
    flags: set[str] = set()
    if not strongly_typed:
        flags |= {DLA_PRECISION_FLAG[p] for p in requested if p in DLA_PRECISION_FLAG}
        notes.append("weakly typed (TensorRT 10 compiles DLA engines from precision flags): TensorRT may run any layer "
                     f"at {', '.join(sorted(flags))}")
    tf32 = Precision.TF32 in requested
    held = sorted(name for name, p in plan.layer_precisions.items() if p is Precision.FP32)
    if tf32 and held:
        # TF32 is a builder-wide math mode; a strongly typed network has no per-layer way to keep
        # a layer out of it, so the layers held at fp32 win: the whole network runs fp32
        tf32 = False
        notes.append(f"TF32 off: {len(held)} ONNX nodes must stay fp32 (e.g. {held[0]}) and TensorRT's TF32 applies to "
                     "every fp32 layer, so the network runs fp32")
    if tf32:
        flags.add("TF32")
    cleared = set() if tf32 else {"TF32"}
    if "TF32" in cleared and Precision.TF32 in device.precisions:
        notes.append("TF32 cleared: TensorRT enables it by default, and fp32 results must stay within fp32 tolerance")
    lowered = sorted({p.value for p in plan.layer_precisions.values() if p not in (Precision.FP32, Precision.TF32)})
    if lowered and strongly_typed:
        notes.append(f"strongly typed: {len(plan.layer_precisions)} ONNX nodes at {', '.join(lowered)} by the graph's "
                     "own casts and Q/DQ nodes")
    if plan.sparse_layers:
        if "2:4" in device.structured_sparsity:
            flags.add("SPARSE_WEIGHTS")
            notes.append(f"2:4 sparse weights in {len(plan.sparse_layers)} layers: sparse tensor-core kernels allowed")
        else:
            notes.append(f"{len(plan.sparse_layers)} layers have 2:4 sparse weights, but {device.model} has no sparse tensor cores")
    if version_compatible:
        flags.add("VERSION_COMPATIBLE")
    dla_core = None
    if is_dla(device):
        dla_core = 0
        flags.add("GPU_FALLBACK")
        notes.append("layers the DLA cannot run fall back to the GPU (GPU_FALLBACK)")
    # TensorRT 11 types every network strongly and deprecates the flag that asks for it
    network_flags = {"STRONGLY_TYPED"} if strongly_typed and trt_major < 11 else set()
    unknown = sorted({f for f in flags | cleared if trt_major not in BUILDER_FLAGS.get(f, ())} |
                     {f for f in network_flags if trt_major not in NETWORK_FLAGS.get(f, ())})
    if unknown:  # a guard on kiln itself: every flag is listed in tensorrt_api, which CI checks against TensorRT
        raise BackendError(f"kiln chose builder flags {', '.join(unknown)} that it does not use with TensorRT {trt_major}",
                           where=where, fix="report this as a kiln bug")
    notes.extend(_profile_notes(profiles))
    return TrtBuildConfig(device.name, workspace_bytes(device), frozenset(flags), frozenset(cleared), strongly_typed,
                          dict(plan.layer_precisions), tuple(profiles), engine_path.with_suffix(".timing.cache"),
                          hardware_compatibility, version_compatible, dla_core, trt_major, frozenset(network_flags),
                          tuple(notes))


def _check_precisions(device: DeviceSpec, plan: PrecisionPlan, where: str) -> None:
    for precision in sorted(plan.requested, key=lambda p: p.value):
        if precision not in device.precisions:
            raise BackendError(f"the precision plan asks for {precision.value}, which {device.model} does not run",
                               where=where, fix=f"use one of {', '.join(sorted(p.value for p in device.precisions))}")
        if precision in QUANTIZED and not plan.explicit_quantization:
            raise BackendError(f"{precision.value} needs quantization scales from Q/DQ nodes in the graph; it has none",
                               where=where, fix="give kiln calibration data (its int8 plans then carry Q/DQ nodes), "
                                                "quantize the model first (PT2E/torchao export Q/DQ), or use a float precision")
        if is_dla(device) and precision not in {Precision.FP16, Precision.INT8}:
            raise BackendError(f"the DLA runs fp16 and int8 only, not {precision.value}", where=where,
                               fix="use precision fp16 or int8 for DLA partitions")


def _profile_notes(profiles: Sequence[ShapeProfile]) -> list[str]:
    notes = []
    for p in profiles:
        opt, top = _volume(p.opt), _volume(p.max)
        if opt and top > 64 * opt:
            notes.append(f"input {p.input}: max shape {list(p.max)} is {top // opt}x the tuned shape; TensorRT reserves "
                         "activation memory for the max (narrow the kiln.Dim range to save memory)")
    return notes


def _volume(shape: Iterable[int]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def optimization_profiles(input_names: Sequence[str], example_inputs: Sequence[torch.Tensor],
                          dynamic_shapes: Sequence | None) -> tuple[ShapeProfile, ...]:
    """One min/opt/max per input with a dynamic dim: min/max from the dim's range, opt the
    example's size (the shape TensorRT tunes its kernels for). Static partitions need none."""
    if not dynamic_shapes:
        return ()
    profiles = []
    for name, example, axes in zip(input_names, example_inputs, dynamic_shapes):
        if not axes:
            continue
        opt = tuple(int(s) for s in example.shape)
        low, high = list(opt), list(opt)
        for axis, dim in axes.items():
            low[axis], high[axis] = int(dim.min), int(dim.max)
        profiles.append(ShapeProfile(name, tuple(low), opt, tuple(high)))
    return tuple(profiles)


def onnx_node_owners(program, gm: GraphModule) -> dict[str, str]:
    """ONNX node name -> name of the partition fx node it was converted from. The exporter
    records each ONNX node's fx node (in its decomposed program); torch.fx provenance
    (`from_node`) leads from there back to the partition's own graph."""
    mine = {n.name for n in gm.graph.nodes}
    graph_id = id(gm.graph)
    exported = {n.name: n for n in program.exported_program.graph.nodes}
    owners = {}
    for onnx_node in program.model.graph:
        fx_text = dict(onnx_node.metadata_props).get("pkg.torch.onnx.fx_node", "")
        fx_name = fx_text.split(" ", 1)[0].lstrip("%")
        node = exported.get(fx_name)
        owner = _provenance_owner(node.meta.get("from_node") or [], graph_id, mine) if node is not None else None
        if owner is None and fx_name in mine:
            owner = fx_name
        if owner is not None and onnx_node.name:
            owners[onnx_node.name] = owner
    return owners


def _provenance_owner(sources, graph_id: int, names: set[str]) -> str | None:
    for source in sources:
        if source.graph_id == graph_id and source.name in names:
            return source.name
        if (found := _provenance_owner(source.from_node, graph_id, names)) is not None:
            return found
    return None


def layer_precisions(gm: GraphModule, owners: Mapping[str, str], default: Precision) -> dict[str, Precision]:
    """ONNX node name -> precision, for nodes whose fx node's NodeDecision differs from `default`."""
    decided = {n.name: d.precision for n in gm.graph.nodes if isinstance(d := n.meta.get(DECISION_META), NodeDecision)}
    return {onnx: decided[fx] for onnx, fx in owners.items() if decided.get(fx, default) != default}


def is_2_4_sparse(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive input channels holds at least 2 zeros (NVIDIA's 2:4
    structured sparsity, the pattern sparse tensor cores skip)."""
    if weight.dim() < 2 or weight.shape[1] % 4:
        return False
    rows = weight.detach().movedim(1, -1).reshape(-1, 4)
    return bool(((rows == 0).sum(dim=1) >= 2).all()) and rows.numel() > 0


def trt_sparse_refusal(weight_shape: Sequence[int]) -> str | None:
    """Why TensorRT's sparse tensor-core kernels cannot take a linear or convolution weight of
    this shape, or None. TensorRT developer guide, "Structured Sparsity": a convolution's weight
    needs at least 2 zeros in every 4 input channels, at each output channel and kernel position;
    a fully connected or MatMul weight the same along its reduction axis. So the input channels
    must come in whole groups of 4."""
    shape = tuple(int(d) for d in weight_shape)
    if len(shape) < 2:
        return f"weight of shape {list(shape)} has no input-channel axis"
    if shape[1] % 4:
        return f"{shape[1]} input channels per group is not a multiple of 4 (TensorRT's 2:4 groups run along them)"
    return None


_WEIGHTED = {torch.ops.aten.linear.default: 1, torch.ops.aten.conv2d.default: 1, torch.ops.aten.conv1d.default: 1,
             torch.ops.aten.conv3d.default: 1, torch.ops.aten.convolution.default: 1}


def sparse_weight_nodes(gm: GraphModule) -> tuple[str, ...]:
    """fx nodes (linear/conv) whose weight is a constant with 2:4 structured sparsity."""
    found = []
    for node in gm.graph.nodes:
        index = _WEIGHTED.get(node.target)
        weight = node.args[index] if index is not None and len(node.args) > index else None
        if isinstance(weight, Node) and weight.op == "get_attr":
            value = operator.attrgetter(weight.target)(gm)
            if isinstance(value, torch.Tensor) and is_2_4_sparse(value):
                found.append(node.name)
    return tuple(found)


# ---------------------------------------------------------------------------------------------
# Capability: ATen ops whose ONNX form TensorRT's parser rejects, or runs other than eager does.
# Sources: onnx-tensorrt docs/operators.md (TensorRT 10 operator matrix) and nvinfer1 limits.

def _reject(reason: str) -> Callable[[Node], str | None]:
    return lambda node: reason


def _not_bool(what: str) -> Callable[[Node], str | None]:
    def check(node: Node) -> str | None:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dtype is torch.bool:
            return None  # exports as And/Or/Xor/Not, which TensorRT runs on BOOL
        return f"TensorRT's ONNX parser has no {what} on integers (onnx-tensorrt: {what} unsupported)"
    return check


def _topk(node: Node) -> str | None:
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k")
    sorted_ = node.args[4] if len(node.args) > 4 else node.kwargs.get("sorted", True)
    if not isinstance(k, int):
        return "TensorRT needs topk's k at build time (onnx-tensorrt: TopK `K` must be an initializer)"
    if k >= MAX_TOPK:
        return f"TensorRT's TopK takes k < {MAX_TOPK}, this asks for k={k}"
    if not sorted_:
        return "TensorRT's TopK returns sorted results only (onnx-tensorrt: `sorted` must be 1)"
    return None


def _pool_dilation(node: Node) -> str | None:
    dilation = node.args[4] if len(node.args) > 4 else node.kwargs.get("dilation", 1)
    values = dilation if isinstance(dilation, (list, tuple)) else [dilation]
    if any(d != 1 for d in values):
        return f"TensorRT pools without dilation only (onnx-tensorrt: `dilations` must be all ones), got {list(values)}"
    return None


def _pool_indices(node: Node) -> str | None:
    if any(u.target is operator.getitem and u.args[1] == 1 for u in node.users):
        return "TensorRT's MaxPool has no `Indices` output (onnx-tensorrt: Indices output unsupported)"
    return _pool_dilation(node)


def _index_put(node: Node) -> str | None:
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    return "TensorRT's ScatterND has no reduction (onnx-tensorrt: `reduction` is not supported)" if accumulate else None


_aten = torch.ops.aten
TRT_RESTRICTIONS: dict[object, Callable[[Node], str | None]] = {
    _aten.bitwise_and.Tensor: _not_bool("BitwiseAnd"), _aten.bitwise_or.Tensor: _not_bool("BitwiseOr"),
    _aten.bitwise_xor.Tensor: _not_bool("BitwiseXor"), _aten.bitwise_not.default: _not_bool("BitwiseNot"),
    # captured graphs keep Python's operators (x & y) as aten.__and__ and friends
    _aten.__and__.Tensor: _not_bool("BitwiseAnd"), _aten.__or__.Tensor: _not_bool("BitwiseOr"),
    _aten.__xor__.Tensor: _not_bool("BitwiseXor"),
    _aten.bitwise_left_shift.Tensor: _reject("TensorRT's ONNX parser has no BitShift"),
    _aten.bitwise_right_shift.Tensor: _reject("TensorRT's ONNX parser has no BitShift"),
    _aten.__lshift__.Tensor: _reject("TensorRT's ONNX parser has no BitShift"),
    _aten.__rshift__.Tensor: _reject("TensorRT's ONNX parser has no BitShift"),
    _aten.bernoulli.default: _reject("TensorRT's ONNX parser has no Bernoulli"),
    _aten.bernoulli.p: _reject("TensorRT's ONNX parser has no Bernoulli"),
    _aten.multinomial.default: _reject("TensorRT's ONNX parser has no Multinomial"),
    _aten.stft.default: _reject("TensorRT's ONNX parser has no STFT"),
    _aten._fft_r2c.default: _reject("TensorRT's ONNX parser has no DFT"),
    _aten._fft_c2r.default: _reject("TensorRT's ONNX parser has no DFT"),
    _aten._fft_c2c.default: _reject("TensorRT's ONNX parser has no DFT"),
    _aten.linalg_det.default: _reject("TensorRT's ONNX parser has no Det"),
    _aten._unique2.default: _reject("TensorRT's ONNX parser has no Unique"),
    _aten.unique_dim.default: _reject("TensorRT's ONNX parser has no Unique"),
    _aten.unique_consecutive.default: _reject("TensorRT's ONNX parser has no Unique"),
    _aten.col2im.default: _reject("TensorRT's ONNX parser has no Col2Im"),
    _aten.max_unpool2d.default: _reject("TensorRT's ONNX parser has no MaxUnpool"),
    _aten.max_unpool3d.default: _reject("TensorRT's ONNX parser has no MaxUnpool"),
    _aten.topk.default: _topk,
    _aten.max_pool1d.default: _reject("TensorRT pools in 2-D or 3-D only (onnx-tensorrt: MaxPool 2D or 3D only)"),
    _aten.avg_pool1d.default: _reject("TensorRT pools in 2-D or 3-D only (onnx-tensorrt: AveragePool 2D or 3D only)"),
    _aten.max_pool2d.default: _pool_dilation, _aten.max_pool3d.default: _pool_dilation,
    _aten.max_pool2d_with_indices.default: _pool_indices, _aten.max_pool3d_with_indices.default: _pool_indices,
    _aten.grid_sampler_3d.default: _reject("TensorRT's GridSample takes 4-D input only"),
    _aten.upsample_bicubic2d.vec: _reject("TensorRT resizes with nearest or linear modes only, not cubic"),
    _aten.upsample_bicubic2d.default: _reject("TensorRT resizes with nearest or linear modes only, not cubic"),
    _aten._upsample_bilinear2d_aa.default: _reject("TensorRT's Resize has no antialiasing"),
    _aten._upsample_bicubic2d_aa.default: _reject("TensorRT's Resize has no antialiasing"),
    _aten.index_put.default: _index_put,
    # kiln's runner sizes outputs from the input shapes; data-dependent shapes need an output allocator
    _aten.nonzero.default: _reject("its output shape depends on the data, and kiln's TensorRT runner allocates "
                                   "outputs from input shapes only"),
    _aten.masked_select.default: _reject("its output shape depends on the data, and kiln's TensorRT runner allocates "
                                         "outputs from input shapes only"),
}


def _tensor_limits(node: Node) -> str | None:
    """Limits that hold for every TensorRT tensor, whatever the op."""
    values = node.meta.get("val")
    for value in values if isinstance(values, (list, tuple)) else [values]:
        if not isinstance(value, torch.Tensor):
            continue
        if value.dtype is torch.float64:
            return "TensorRT has no float64: it would compute in float32, outside float64's results"
        if value.is_complex():
            return f"TensorRT has no complex types ({value.dtype})"
        if value.dim() > MAX_RANK:
            return f"TensorRT tensors have at most {MAX_RANK} dimensions, this one has {value.dim()}"
    return None


def trt_supports(node: Node, exporter_check: Callable[[Node], Support]) -> Support:
    """TensorRT's answer for one node: TensorRT's own limits, then the ONNX export's."""
    if node.op != "call_function":
        return Support(True)
    if (reason := _tensor_limits(node)) is not None:
        return Support(False, reason)
    check = TRT_RESTRICTIONS.get(node.target)
    if check is not None and (reason := check(node)) is not None:
        return Support(False, reason)
    return exporter_check(node)


@dataclass(frozen=True)
class ParserError:
    """One error the ONNX parser reported (from trt.IParserError), as plain data."""

    node_name: str
    operator: str
    description: str


def parser_failures(errors: Sequence[ParserError], owners: Mapping[str, str]) -> dict[str, Support]:
    """fx node name (or ONNX node name when no fx owner is known) -> Support(False, reason)
    for each node the parser refused; the first error per node is kept."""
    result: dict[str, Support] = {}
    for error in errors:
        key = owners.get(error.node_name, error.node_name or "<model>")
        if key not in result:
            op = f"{error.operator} " if error.operator else ""
            result[key] = Support(False, f"TensorRT's ONNX parser refused {op}node {error.node_name or '?'}: "
                                         f"{error.description.strip()}")
    return result


# ---------------------------------------------------------------------------------------------
# Engine compatibility: TensorRT engines are tied to the TensorRT version and the GPU they were
# built for unless built version- or hardware-compatible.

@dataclass(frozen=True)
class EngineFacts:
    tensorrt: str
    compute_capability: tuple[int, int]
    gpu: str
    hardware_compatibility: str = "NONE"
    version_compatible: bool = False

    def to_meta(self) -> dict:
        return {"tensorrt": self.tensorrt, "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
                "gpu": self.gpu, "hardware_compatibility": self.hardware_compatibility,
                "version_compatible": self.version_compatible}

    @classmethod
    def from_meta(cls, meta: Mapping) -> "EngineFacts":
        major, minor = (int(x) for x in str(meta["compute_capability"]).split("."))
        return cls(str(meta["tensorrt"]), (major, minor), str(meta["gpu"]), str(meta.get("hardware_compatibility", "NONE")),
                   bool(meta.get("version_compatible", False)))


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def incompatibility(built: EngineFacts, tensorrt: str, compute_capability: tuple[int, int], gpu: str) -> str | None:
    """Why an engine with `built` facts cannot run under this TensorRT on this GPU, or None."""
    here, then = _version(tensorrt), _version(built.tensorrt)
    if major_of(tensorrt) != major_of(built.tensorrt):
        # version compatibility holds within a major only; 11 also dropped 10's weakly typed engines
        return (f"the engine was built with TensorRT {built.tensorrt} (major {major_of(built.tensorrt)}); this is TensorRT "
                f"{tensorrt} (major {major_of(tensorrt)}), and no TensorRT engine runs under another major version, "
                "version-compatible or not")
    if built.version_compatible:
        if here < then:
            return (f"the engine was built with TensorRT {built.tensorrt} (version-compatible), which runs on that "
                    f"version or later; this is TensorRT {tensorrt}")
    elif here != then:
        return f"the engine was built with TensorRT {built.tensorrt}; this is TensorRT {tensorrt}, and engines run only on the version that built them"
    cc_then = ".".join(map(str, built.compute_capability))
    cc_here = ".".join(map(str, compute_capability))
    if built.hardware_compatibility == "AMPERE_PLUS":
        if tuple(compute_capability) < (8, 0):
            return f"the engine is built for Ampere and newer GPUs (compute capability 8.0+); this {gpu} is {cc_here}"
    elif tuple(compute_capability) != tuple(built.compute_capability):
        return (f"the engine was built for compute capability {cc_then} ({built.gpu}); this GPU, {gpu}, "
                f"is compute capability {cc_here}")
    return None


def has_qdq(op_types: Iterable[str]) -> bool:
    """Whether an ONNX graph's ops include quantize/dequantize pairs (explicit quantization)."""
    ops = set(op_types)
    return "QuantizeLinear" in ops and "DequantizeLinear" in ops
