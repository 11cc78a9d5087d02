"""TorchInductor backend: AOTInductor compiles the captured program ahead of time into a
.pt2 package (generated kernels plus a shared library) that runs in-process and is the saved
engine, so what runs now is exactly what reloads later.

On CPU the kernels are C++/OpenMP; on a CUDA device they are Triton kernels, and the package
is built from a copy of the partition moved to the GPU (weights, example inputs, and the
device/dtype arguments of factory ops). The partition's precision (bf16/fp16) casts that copy's
weights and float arithmetic; the engine casts float inputs down and outputs back, so callers
keep the partition's own dtypes. AOTInductor has no CUDA-graph mode of its own: for partitions
without dynamic dims the engine captures the package's run in a torch.cuda.CUDAGraph on first
call and replays it (loaded single-threaded, as AOTInductor asks for CUDA graphs). With
`autotune` Inductor benchmarks kernel variants (max-autotune) while building.

Compiling takes tens of seconds per model here (mostly the C++ compiler); kiln's selection
counts that time in the report. Inductor's own caches make a second compile of the same
graph much faster. The CUDA paths need a GPU: tests/backends/test_inductor_cuda.py checks
them there and skips elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import zipfile
from pathlib import Path
from typing import ClassVar

import torch
from torch.fx import GraphModule, Node

from kiln.backends.base import (Availability, BackendBase, BackendSettings, CapabilityTable, EngineEntry, OpSupport, export_partition,
                                place_engine_file)
from kiln.ir import PartitionGraph
from kiln.backends.inductor_precision import lowered_program
from kiln.backends.inductor_sparsity import to_semi_structured
from kiln.errors import BackendError, BackendUnavailable, KilnError
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.frontend.moe_op import MOE_EXPERTS
from kiln.types import DTYPE_NAMES, DTYPES, DeviceKind, Precision

LOW_PRECISION: dict[Precision, torch.dtype] = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def _device_ready(device: DeviceSpec) -> str | None:
    if device.kind is DeviceKind.GPU and not torch.cuda.is_available():
        return (f"device {device.name} ({device.model}) is a CUDA GPU, and no CUDA GPU is present on this machine "
                "(torch.cuda.is_available() is False); kiln's Inductor backend builds CUDA engines only where one is")
    return None


# Inductor lowers every ATen op (falling back to ATen kernels where it has no codegen), so no op
# is left out; the table narrows precisions. What kiln's Inductor path lowers fast: on CPU, bf16
# (oneDNN, fp32 accumulation), int8 (PT2E X86InductorQuantizer) and int4 weight-only (PyTorch's
# packed int4 matmul, the kernel torchao uses there); on CUDA, bf16 and fp16.
_ALL_BUT_INT4 = frozenset(Precision) - {Precision.INT4}
CAPABILITIES = CapabilityTable(
    "inductor",
    {DeviceKind.CPU: frozenset({Precision.FP32, Precision.BF16, Precision.INT8, Precision.INT4}),
     DeviceKind.GPU: frozenset({Precision.FP32, Precision.BF16, Precision.FP16})},
    # int4 weight-only: linear layers only (inductor_precision packs their weights)
    ops={torch.ops.aten.linear.default: OpSupport(frozenset(Precision)),
         # Inductor would call it as an opaque kernel inside its graph, and then take the whole
         # model, the ops OpenVINO or ONNX Runtime run faster too: it runs in kiln's eager partition
         MOE_EXPERTS: OpSupport(frozenset(Precision), check=lambda node: "kiln::moe_experts runs in kiln's eager partition")},
    default=OpSupport(_ALL_BUT_INT4),
    device_ready=_device_ready,
)

# Generated kernels by name: C++ kernels on CPU, Triton kernels (pointwise, reduction,
# persistent reduction, template, foreach) on CUDA.
_KERNEL_NAME = re.compile(r"\b(cpp_fused_\w+|triton_(?:poi|red|per|tem|for|unk)_\w+)\b")


def count_kernels(package: Path) -> int | None:
    """Distinct generated kernels named in the package's C++ sources (wrapper and kernels);
    None when the package holds no sources to count from."""
    names: set[str] = set()
    sources = 0
    with zipfile.ZipFile(package) as archive:
        for member in archive.namelist():
            if member.endswith(".cpp"):
                sources += 1
                names.update(_KERNEL_NAME.findall(archive.read(member).decode("utf-8", "replace")))
    return len(names) if sources else None


def lower_for(gm: GraphModule, device: torch.device, dtype: torch.dtype | None) -> GraphModule:
    """A copy of `gm` that runs on `device` (and in `dtype` for float math): weights and
    constants moved and cast, factory ops' device and float32 dtype arguments rewritten, and
    export's tensor-metadata assertions dropped (they assert the captured cpu/fp32 metadata;
    kiln checks call inputs itself). `gm` is left as it was."""
    lowered = copy.deepcopy(gm)
    for name, value in list(_tensor_attributes(lowered)):
        moved = value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)
        _set_attribute(lowered, name, moved)
    for node in list(lowered.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            lowered.graph.erase_node(node)
            continue
        node.args = tuple(_retarget(a, device, dtype) for a in node.args)
        node.kwargs = {k: _retarget(v, device, dtype) for k, v in node.kwargs.items()}
    lowered.graph.lint()
    lowered.recompile()
    return lowered


def _tensor_attributes(gm: GraphModule):
    seen = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in seen:
            seen.add(node.target)
            value = _get_attribute(gm, node.target)
            if isinstance(value, torch.Tensor):
                yield node.target, value


def _get_attribute(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _set_attribute(module, dotted: str, value: torch.Tensor) -> None:
    *path, last = dotted.split(".")
    owner = _get_attribute(module, ".".join(path)) if path else module
    current = getattr(owner, last)
    if isinstance(current, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    if last in owner._parameters:
        owner._parameters[last] = value
    elif last in owner._buffers:
        owner._buffers[last] = value
    else:
        setattr(owner, last, value)


def _retarget(value, device: torch.device, dtype: torch.dtype | None):
    if isinstance(value, torch.device):
        return device
    if dtype is not None and value is torch.float32:
        return dtype
    if isinstance(value, (list, tuple)) and not isinstance(value, Node):
        return type(value)(_retarget(v, device, dtype) for v in value)
    return value


class _GraphReplay:
    """A CUDA graph of one package run on static input buffers, replayed per call."""

    def __init__(self, runner, example: list[torch.Tensor]):
        self.inputs = [x.clone() for x in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (first runs allocate and fold constants)
            for _ in range(2):
                runner(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = runner(*self.inputs)
        self.outputs = list(out) if isinstance(out, (list, tuple)) else [out]

    def matches(self, inputs: list[torch.Tensor]) -> bool:
        return all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(self.inputs, inputs))

    def __call__(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        return [o.clone() for o in self.outputs]  # the next replay overwrites the static outputs


class InductorEngine:
    backend = "inductor"

    def __init__(self, package_path: Path, meta: dict | None = None):
        self.package_path = package_path
        self.meta = dict(meta or {})
        self.summary = ""
        self.device = torch.device(self.meta.get("device", "cpu"))
        self.dtype = DTYPES[self.meta["dtype"]] if self.meta.get("dtype") else None
        self.output_dtypes = [DTYPES[d] for d in self.meta.get("output_dtypes", [])]
        self.cuda_graph = bool(self.meta.get("cuda_graph", False))
        self._replay: _GraphReplay | None = None
        self.cuda_graph_error = ""
        try:
            self.runner = torch._inductor.aoti_load_package(str(package_path), run_single_threaded=self.cuda_graph)
        except Exception as exc:
            raise BackendError(f"AOTInductor could not load the package: {exc}", where=str(package_path),
                               fix="rebuild the artifact with this torch version") from exc

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.device.type == "cpu" and self.dtype is None:
            with torch.no_grad():
                out = self.runner(*inputs)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)
        home = inputs[0].device if inputs else self.device
        ready = [x.to(device=self.device, dtype=self.dtype if self.dtype is not None and x.is_floating_point() else x.dtype)
                 for x in inputs]
        with torch.no_grad(), self._fp32_convolutions():
            outs = self._run(ready)
        wanted = self.output_dtypes or [o.dtype for o in outs]
        return tuple(o.to(device=home, dtype=want) for o, want in zip(outs, wanted))

    def _fp32_convolutions(self):
        """cuDNN runs fp32 convolutions in TF32 by default, outside fp32's tolerance; an fp32
        engine turns that off for its own calls only."""
        cudnn = torch.backends.cudnn
        if self.device.type != "cuda" or self.dtype is not None:
            return contextlib.nullcontext()
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False)

    def _run(self, ready: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.cuda_graph and not self.cuda_graph_error:
            if self._replay is None:
                try:
                    self._replay = _GraphReplay(self.runner, ready)
                except Exception as exc:  # the package still runs without a graph; the summary says why
                    self.cuda_graph_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                    self.summary += f"; CUDA graph capture failed ({self.cuda_graph_error}), running without"
            if self._replay is not None and self._replay.matches(ready):
                return self._replay(ready)
        out = self.runner(*ready)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def save(self, directory: Path, stem: str) -> EngineEntry:
        target = directory / f"{stem}.pt2"
        place_engine_file(self.package_path, target)
        return EngineEntry(self.backend, [target.name], {"torch": torch.__version__, **self.meta, "summary": self.summary})


def _configs(settings: BackendSettings, cuda: bool) -> dict:
    # freezing: weights become constants, so Inductor folds them and prepacks GEMM weights
    # for oneDNN on CPU (about 5% on MiniLM here); cpp.threads: the build's thread budget.
    configs: dict = {"freezing": True}
    if not cuda:
        configs["cpp.threads"] = settings.threads
    if settings.autotune:
        configs["max_autotune"] = True  # benchmark GEMM/conv templates and kernel configs at build time
    return configs


def _output_dtypes(partition: PartitionGraph) -> list[str]:
    output = next(n for n in partition.gm.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    return [DTYPE_NAMES[v.meta["val"].dtype] for v in values if isinstance(v, Node) and "val" in v.meta]


def _lowered_partition(partition: PartitionGraph, device: torch.device, dtype: torch.dtype | None) -> PartitionGraph:
    examples = tuple(x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else x.dtype)
                     for x in partition.example_inputs)
    return PartitionGraph(partition.name, lower_for(partition.gm, device, dtype), partition.input_names,
                          partition.output_names, examples, partition.dynamic_shapes)


# What AOTInductor's package loader may find in a package kiln saved: the archive's metadata and
# the compiled model's files under data/aotinductor/model/. The loader (torch's load_pt2) also
# reads any torch.export program (models/*.json, with its pickled legacy weights and sample
# inputs), pickled weights under data/weights/ and script objects under data/constants/; kiln
# never writes those into an Inductor engine, so any other member is refused before the loader
# opens the file. The shared library itself is native code by design: the manifest's checksum
# covers it, and only a pinned digest says it is the one you built.
_AOTI_SUFFIXES = (".so", ".cpp", ".h", ".json", ".cubin", ".fatbin", ".ptx", ".spv", ".hsaco", ".o")
_AOTI_FILE = re.compile(r"data/aotinductor/model/[\w.+-]+")


def _sparse_program(partition: PartitionGraph, device: torch.device, dtype: torch.dtype | None):
    """The exported program of `partition` on `device` in `dtype`, with its 2:4 linear weights as
    semi-structured sparse tensors, and a note saying what was converted. Where export refuses
    the sparse tensors, the pruned weights are exported dense and the note says why (same
    answers, no sparse speed-up). Untested until a GPU runs it (scripts/gpu_check.sh)."""
    source = _lowered_partition(partition, device, dtype)
    converted, refused = to_semi_structured(source.gm, {layer.node: layer.weight for layer in partition.precision.sparse})
    left = f"; left dense: {'; '.join(refused[:3])}" if refused else ""
    if not converted:
        return export_partition(source), f"2:4-pruned weights dense{left}"
    try:
        return export_partition(source), f"{len(converted)} linear weights as 2:4 semi-structured sparse tensors{left}"
    except Exception as exc:  # recorded in the engine summary; the dense pruned weights give the same answers
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return (export_partition(_lowered_partition(partition, device, dtype)),
                f"2:4-pruned weights exported dense: torch.export refused the semi-structured tensors ({why})")


def _check_package(path: Path) -> None:
    from kiln.backends.eager import PT2_METADATA, pt2_members

    archive, members = pt2_members(path, "Inductor engine")
    archive.close()
    for name in members:
        if name in PT2_METADATA or (_AOTI_FILE.fullmatch(name) and name.endswith(_AOTI_SUFFIXES)):
            continue
        raise BackendError(f"Inductor engine holds member {name!r}, which kiln never writes (it could hold a pickle)",
                           where=str(path), fix="rebuild the artifact from the model; pin its digest to load only the artifact you built")


class InductorBackend(BackendBase):
    name: ClassVar[str] = "inductor"
    build_modules: ClassVar[tuple[str, ...]] = ("torch._inductor", "torch._inductor.compile_fx")
    capabilities: ClassVar[CapabilityTable] = CAPABILITIES

    def available(self) -> Availability:
        try:
            from torch._inductor import aoti_compile_and_package  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"this torch has no AOTInductor ({exc})", "pip install torch>=2.6")
        if shutil.which("c++") is None and shutil.which("g++") is None:
            return Availability(False, "no C++ compiler on PATH (Inductor generates C++ on CPU)", "apt-get install g++")
        return Availability(True, version=torch.__version__)

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> InductorEngine:
        status = self.available()
        if not status.ok:
            raise BackendUnavailable(f"Inductor backend unavailable: {status.reason}", fix=status.install_hint)
        if (reason := _device_ready(settings.device)) is not None:
            raise BackendUnavailable(reason, where=f"partition {partition.name}", fix="build for a CPU profile, or on a machine with a CUDA GPU")
        cuda = settings.device.kind is DeviceKind.GPU
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        # On CPU a lowered precision plan is applied layer by layer (casts or PT2E int8); on CUDA
        # the partition computes in the plan's lowest float type.
        per_layer = not cuda and bool(partition.precision.lowered)
        dtype = None if per_layer else LOW_PRECISION.get(settings.precision)
        source = _lowered_partition(partition, device, dtype) if cuda or dtype is not None else partition
        path = settings.workdir / f"{partition.name}.pt2"
        lowered, sparse_note = "", ""
        try:
            if per_layer:
                exported, lowered = lowered_program(partition)
            elif cuda and partition.precision.sparse:
                exported, sparse_note = _sparse_program(partition, device, dtype)
            else:
                exported = export_partition(source)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                     inductor_configs=_configs(settings, cuda))
        except KilnError:
            raise  # already says what, where and the fix (a precision plan it cannot lower, a missing torchao)
        except Exception as exc:
            raise BackendError(f"AOTInductor failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                               where=f"partition {partition.name}", fix="try backend='onnxruntime'") from exc
        meta = {"device": "cuda" if cuda else "cpu", "dtype": DTYPE_NAMES[dtype] if dtype is not None else None,
                "output_dtypes": _output_dtypes(partition), "cuda_graph": cuda and partition.dynamic_shapes is None,
                "autotune": settings.autotune}
        engine = InductorEngine(path, meta)
        kernels = count_kernels(path)
        engine.meta["kernels"] = kernels
        parts = [f"AOTInductor package {path.stat().st_size / 1e6:.1f} MB",
                 f"{kernels} generated kernels" if kernels is not None else "kernel count unavailable (no sources in the package)"]
        if cuda:
            parts.append("CUDA graph replay" if meta["cuda_graph"] else "no CUDA graph (dynamic shapes)")
        if dtype is not None:
            parts.append(f"computes in {DTYPE_NAMES[dtype]}")
        if lowered:
            parts.append(lowered)
        if sparse_note:
            parts.append(sparse_note)
        elif partition.precision.sparse:
            parts.append(f"{len(partition.precision.sparse)} layers with 2:4-pruned weights run dense "
                         f"({'no semi-structured lowering for a per-layer plan' if cuda else 'semi-structured sparse kernels need CUDA'})")
        if settings.autotune:
            parts.append("max-autotune")
        engine.summary = ", ".join(parts)
        return engine

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> InductorEngine:
        _check_package(directory / entry.files[0])
        meta = {k: v for k, v in entry.meta.items() if k not in ("torch", "summary", "output_names")}
        if meta.get("device") == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("this Inductor engine was built for a CUDA GPU, and no CUDA GPU is present "
                                     "(torch.cuda.is_available() is False)", where=str(directory / entry.files[0]),
                                     fix="load it on a machine with a CUDA GPU, or rebuild it for a CPU profile")
        engine = InductorEngine(directory / entry.files[0], meta)
        engine.summary = entry.meta.get("summary", "")
        return engine
