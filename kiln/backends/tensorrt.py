"""TensorRT backend: kiln's own ONNX export (the ONNX Runtime backend's `export_onnx`, unfused)
with the partition's precision plan written into the graph (`tensorrt_precision`: casts around
bf16/fp16 layers, Q/DQ nodes with kiln's scales for int8/fp8 layers), parsed by TensorRT's
ONNX parser into a strongly typed network, built into a serialized engine (.plan) with the
settings `tensorrt_config.derive_build_config` chose from the profile device, the plan and the
installed TensorRT major, and run on torch CUDA tensors on torch's current stream.

TensorRT 10 and 11 are supported (`tensorrt_api.SUPPORTED_MAJORS`); 11 removed weak typing
(precision builder flags, layer precision setters, implicit int8 calibrators), which 10 had
deprecated since 10.12, so kiln uses none of it except for a DLA on TensorRT 10, whose compiler
takes precision flags only.

What runs where:
- Decided without TensorRT, tested on CPU (tests/backends/test_tensorrt*.py): the build config
  (workspace, strong typing, flags, sparse weights, optimization profiles, timing cache,
  compatibility), the ONNX graph's casts and Q/DQ nodes, the dtype tables, the capability
  table, parser refusals as Support values, engine compatibility on load, availability and
  device readiness.
- Checked against NVIDIA's real compiled bindings (10.x and 11.x) on CPU, without running them:
  every TensorRT name, call, property write and override in this file
  (tests/backends/test_tensorrt_conformance.py, through `tensorrt_api`), and the logger
  receiving the library's own messages (the lean runtime, which loads without a GPU).
- Runs only on an NVIDIA GPU with TensorRT (scripts/gpu_check.sh): `_build` (builder,
  network, parser, config, timing cache) and `TensorRTEngine` (deserialize, execute_async_v3).

Parameters holding TensorRT objects are annotated with their class (`builder: trt.Builder`):
the conformance check reads the annotations to know what each name is.

An engine is tied to the TensorRT version and GPU that built it; the manifest records both
and `load` refuses a mismatch (always across majors) with ArtifactError before TensorRT sees
the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch.fx import Node

from kiln.backends.base import (Availability, BackendBase, BackendSettings, CapabilityTable, EngineEntry, OpSupport, Support)
from kiln.backends.tensorrt_api import INSTALL, major_of, unsupported_major
from kiln.backends.tensorrt_config import (TRT_DATATYPE, TRT_RESTRICTIONS, EngineFacts, ParserError, PrecisionPlan,
                                           TrtBuildConfig, derive_build_config, has_qdq, incompatibility, is_dla,
                                           layer_precisions, onnx_node_owners, optimization_profiles, parser_failures,
                                           sparse_weight_nodes, torch_dtype, trt_supports)
from kiln.errors import ArtifactError, BackendError, BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.ir import PartitionGraph
from kiln.types import DTYPE_NAMES, DTYPES, DeviceKind, Precision

if TYPE_CHECKING:  # the classes parameter annotations name (tensorrt_api reads them); not imported at run time
    import tensorrt as trt

INSTALL_HINT = ("pip install tensorrt (kiln builds with TensorRT 10 and 11); it needs an NVIDIA GPU with its CUDA driver "
                "and a CUDA build of torch")


def _no_cuda() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is present (torch.cuda.is_available() is False)"
    return None


def device_ready(device: DeviceSpec) -> str | None:
    """Why this machine cannot build TensorRT engines for `device`, or None."""
    if device.kind is DeviceKind.NPU and not is_dla(device):
        return f"device {device.name} ({device.model}) is not an NVIDIA DLA; TensorRT drives NVIDIA GPUs and DLAs only"
    if (reason := _no_cuda()) is not None:
        return f"device {device.name} ({device.model}) needs an NVIDIA GPU, and {reason} on this machine"
    return None


def _trt_coverage(node: Node) -> Support:
    from kiln.backends.onnxruntime import exporter_supports

    return trt_supports(node, exporter_supports)


# TensorRT's own limits (TRT_RESTRICTIONS, tensor limits) on top of the ONNX export's coverage.
# Per-layer precisions kiln expresses on a GPU (tf32 is a math mode, not a layer precision, and
# int4 weight-only goes to the runtimes with an int4 matmul kernel); a DLA runs fp16 and int8
# itself and leaves fp32 layers to the GPU beside it.
CAPABILITIES = CapabilityTable(
    "tensorrt",
    {DeviceKind.GPU: frozenset({Precision.FP32, Precision.FP16, Precision.BF16, Precision.INT8, Precision.FP8}),
     DeviceKind.NPU: frozenset({Precision.FP32, Precision.FP16, Precision.INT8})},
    ops={op: OpSupport(frozenset(TRT_DATATYPE), check) for op, check in TRT_RESTRICTIONS.items()},
    coverage=_trt_coverage,
    device_ready=device_ready,
)


def _import_trt():
    import tensorrt

    return tensorrt


def _make_logger(trt):
    """A TensorRT logger that keeps errors, so a failed build says why, and warnings, which the
    build summary counts."""

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(str(msg))

    return Log()


class TensorRTEngine:
    backend = "tensorrt"

    def __init__(self, plan_path: Path, facts: EngineFacts, io: dict, config: dict):
        trt = _import_trt()
        self.plan_path, self.facts, self.io, self.config = plan_path, facts, io, config
        self.summary = ""
        self._logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise BackendError(f"TensorRT could not deserialize the engine: {'; '.join(self._logger.errors[-3:])}",
                               where=str(plan_path), fix="rebuild the artifact with `kiln compile` on this machine")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        engine_inputs = {n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        # the partition's order; an input the exporter found unused is not an engine input
        self._inputs = [(i, n) for i, n in enumerate(io["inputs"]) if n in engine_inputs]
        self._outputs = list(io["outputs"])
        self._dtype = {n: torch_dtype(self._engine.get_tensor_dtype(n).name, n, str(plan_path)) for n in names}
        self._want = [DTYPES[d] for d in io["output_dtypes"]]
        self._device = torch.device("cuda", torch.cuda.current_device())

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        home = inputs[0].device if inputs else self._device
        stream = torch.cuda.current_stream(self._device)
        keep = []  # device copies must live until the engine has run
        for index, name in self._inputs:
            x = inputs[index].to(device=self._device, dtype=self._dtype[name]).contiguous()
            keep.append(x)
            self._context.set_input_shape(name, tuple(x.shape))
            self._context.set_tensor_address(name, x.data_ptr())
        outputs = []
        for name in self._outputs:
            shape = tuple(self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"output {name} has a data-dependent shape {shape}", where=str(self.plan_path),
                                   fix="use another backend for this model")
            out = torch.empty(shape, dtype=self._dtype[name], device=self._device)
            self._context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT's execute_async_v3 failed", where=str(self.plan_path), fix="check the inputs' shapes against the compiled spec")
        return tuple(o.to(device=home, dtype=want) for o, want in zip(outputs, self._want))

    def save(self, directory: Path, stem: str) -> EngineEntry:
        target = directory / f"{stem}.plan"
        target.write_bytes(self.plan_path.read_bytes())
        return EngineEntry(self.backend, [target.name], {"built_with": self.facts.to_meta(), "io": self.io,
                                                          "build_config": self.config, "summary": self.summary})


def check_loadable(meta: dict, tensorrt: str, compute_capability: tuple[int, int], gpu: str, where: str) -> EngineFacts:
    """The engine's recorded facts, or ArtifactError when this TensorRT/GPU cannot run it."""
    try:
        facts = EngineFacts.from_meta(meta["built_with"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"the TensorRT engine's manifest entry lacks its build facts ({exc})", where=where,
                            fix="rebuild the artifact with `kiln compile`") from None
    if (reason := incompatibility(facts, tensorrt, compute_capability, gpu)) is not None:
        raise ArtifactError(reason, where=where,
                            fix="rebuild the artifact with `kiln compile` on this machine (TensorRT engines are specific "
                                "to the TensorRT version and GPU that built them)")
    return facts


class TensorRTBackend(BackendBase):
    name: ClassVar[str] = "tensorrt"
    capabilities: ClassVar[CapabilityTable] = CAPABILITIES

    def available(self) -> Availability:
        try:
            trt = _import_trt()
        except ImportError:
            trt = None
        cuda = _no_cuda()
        if trt is None:
            return Availability(False, "tensorrt is not installed" + (f" and {cuda}" if cuda else ""), INSTALL_HINT)
        if (old := unsupported_major(trt.__version__)) is not None:
            return Availability(False, old, INSTALL, trt.__version__)
        if cuda is not None:
            return Availability(False, f"tensorrt {trt.__version__} is installed but {cuda}", INSTALL_HINT, trt.__version__)
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401  (kiln's ONNX export needs it)
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed (kiln exports to ONNX for TensorRT)",
                                "pip install onnx onnxscript", trt.__version__)
        return Availability(True, version=trt.__version__)

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> TensorRTEngine:
        self._require()
        from kiln.backends.tensorrt_precision import export_lowered

        trt = _import_trt()
        onnx_path = settings.workdir / f"{partition.name}.tensorrt.onnx"
        lowered = export_lowered(partition, onnx_path)
        owners = onnx_node_owners(lowered.program, lowered.gm)
        graph_precisions = {**layer_precisions(lowered.gm, owners, Precision.FP32), **lowered.layer_precisions}
        plan = PrecisionPlan(settings.precision, graph_precisions, explicit_quantization=_has_qdq(onnx_path),
                             sparse_layers=sparse_weight_nodes(partition.gm))
        engine_path = settings.workdir / f"{partition.name}.plan"
        config = derive_build_config(settings.device, plan,
                                     optimization_profiles(partition.input_names, partition.example_inputs, partition.dynamic_shapes),
                                     engine_path, trt_major=major_of(trt.__version__))
        engine_path.write_bytes(_build(trt, onnx_path, config, owners, partition.name))
        facts = EngineFacts(trt.__version__, tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name(),
                            config.hardware_compatibility, config.version_compatible)
        io = {"inputs": list(partition.input_names), "outputs": list(partition.output_names),
              "output_dtypes": _output_dtypes(partition)}
        engine = TensorRTEngine(engine_path, facts, io, config.to_meta())
        engine.summary = _summary(engine_path, facts, config, settings.device, lowered.summary)
        return engine

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> TensorRTEngine:
        self._require()
        trt = _import_trt()
        path = directory / entry.files[0]
        facts = check_loadable(entry.meta, trt.__version__, tuple(torch.cuda.get_device_capability()),
                               torch.cuda.get_device_name(), str(path))
        engine = TensorRTEngine(path, facts, entry.meta["io"], entry.meta.get("build_config", {}))
        engine.summary = entry.meta.get("summary", "")
        return engine

    def _require(self) -> None:
        status = self.available()
        if not status.ok:
            raise BackendUnavailable(f"TensorRT backend unavailable: {status.reason}", fix=status.install_hint)


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    return has_qdq(n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def _output_dtypes(partition: PartitionGraph) -> list[str]:
    output = next(n for n in partition.gm.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    return [DTYPE_NAMES[v.meta["val"].dtype] for v in values]


def _summary(engine_path: Path, facts: EngineFacts, config: TrtBuildConfig, device: DeviceSpec, lowering: str = "") -> str:
    parts = [f"TensorRT {facts.tensorrt} engine {engine_path.stat().st_size / 1e6:.1f} MB for {facts.gpu} "
             f"(compute capability {facts.compute_capability[0]}.{facts.compute_capability[1]})",
             f"flags {', '.join(sorted(config.flags)) or 'none'}", "strongly typed" if config.strongly_typed else "weakly typed"]
    if lowering:
        parts.append(lowering)
    if config.profiles:
        parts.append(f"dynamic inputs {', '.join(p.input for p in config.profiles)}")
    if not _same_gpu_family(device.model, facts.gpu):
        parts.append(f"built on {facts.gpu}, not the profile's {device.model}")
    return "; ".join(parts)


def _same_gpu_family(model: str, gpu: str) -> bool:
    # "NVIDIA H100-SXM5-80GB" (profile) vs "NVIDIA H100 80GB HBM3" (driver): compare product codes
    codes = re.findall(r"\b[A-Z]+\d+\b|Orin|Xavier", model)
    return not codes or any(code in gpu for code in codes)


def _build(trt, onnx_path: Path, config: TrtBuildConfig, owners: dict[str, str], partition: str) -> bytes:
    """Parse the ONNX file and build a serialized engine with `config`."""
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0  # STRONGLY_TYPED on TensorRT 10; 11 types every network strongly (derive_build_config)
    for flag in sorted(config.network_flags):
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        failures = parser_failures(errors, owners)
        listed = "; ".join(f"node {node}: {support.reason}" for node, support in list(failures.items())[:3])
        error = BackendError(f"TensorRT's ONNX parser refused {len(failures)} node(s): {listed}", where=f"partition {partition}",
                             fix="use another backend for this partition (the profile's next preference)")
        error.unsupported = failures
        raise error
    builder_config = builder.create_builder_config()
    _apply_config(trt, builder, builder_config, config)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise BackendError(f"TensorRT's builder failed: {'; '.join(logger.errors[-3:]) or 'no error logged'}",
                           where=f"partition {partition}", fix="use another backend for this partition, or report the model")
    config.timing_cache.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    return bytes(serialized)


def _parser_error(error: trt.ParserError) -> ParserError:
    return ParserError(error.node_name(), error.node_operator(), error.desc())


def _apply_config(trt, builder: trt.Builder, builder_config: trt.IBuilderConfig, config: TrtBuildConfig) -> None:
    """Replay `config` on TensorRT's builder config. Only flags `tensorrt_api.BUILDER_FLAGS`
    lists for the installed major reach here (derive_build_config checks), and no layer is
    touched: per-layer precision is in the graph."""
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    for flag in sorted(config.flags):
        builder_config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in sorted(config.cleared_flags):
        builder_config.clear_flag(getattr(trt.BuilderFlag, flag))
    builder_config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, config.hardware_compatibility)
    if config.dla_core is not None:
        builder_config.default_device_type = trt.DeviceType.DLA
        builder_config.DLA_core = config.dla_core
    if config.profiles:
        profile = builder.create_optimization_profile()
        for shapes in config.profiles:
            profile.set_shape(shapes.input, shapes.min, shapes.opt, shapes.max)
        builder_config.add_optimization_profile(profile)
    # a cache left by an earlier build of this partition saves re-timing the same kernels
    previous = config.timing_cache.read_bytes() if config.timing_cache.is_file() else b""
    builder_config.set_timing_cache(builder_config.create_timing_cache(previous), ignore_mismatch=False)
