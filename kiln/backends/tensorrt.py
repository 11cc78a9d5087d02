"""TensorRT backend: kiln's own ONNX export (the ONNX Runtime backend's `export_onnx`, unfused)
parsed by TensorRT's ONNX parser into a network, built into a serialized engine (.plan) with
the settings `tensorrt_config.derive_build_config` chose from the profile device and the
partition's precision plan, and run on torch CUDA tensors on torch's current stream.

What runs where:
- Decided without TensorRT, tested on CPU (tests/backends/test_tensorrt.py): the build config
  (workspace, precision flags, per-layer constraints, sparse weights, optimization profiles,
  timing cache, compatibility), the capability table, parser refusals as Support values,
  engine compatibility on load, availability and device readiness.
- Calls TensorRT, NOT tested by kiln's CI (no GPU, no TensorRT there): `_build` (builder,
  network, parser, builder config, layer precisions, timing cache, calibration cache),
  `TensorRTEngine` (runtime, deserialize, execution context, execute_async_v3) and the
  version/GPU queries in `compile` and `load`. They follow TensorRT 10's Python API
  (strongly typed networks are the only kind from TensorRT 11, which derive_build_config
  accounts for); run tests/backends/test_tensorrt.py's GPU tests on an NVIDIA machine with
  `pip install tensorrt` before relying on them.

An engine is tied to the TensorRT version and GPU that built it; the manifest records both
and `load` refuses a mismatch with ArtifactError before TensorRT sees the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar

import torch
from torch.fx import Node

from kiln.backends.base import (Availability, BackendBase, BackendSettings, CapabilityTable, EngineEntry, OpSupport, Support)
from kiln.ir import PartitionGraph
from kiln.backends.tensorrt_config import (TRT_DATATYPE, TRT_RESTRICTIONS, EngineFacts, ParserError, PrecisionPlan,
                                           TrtBuildConfig, derive_build_config, has_qdq, incompatibility, is_dla,
                                           layer_owner, layer_precisions, onnx_node_owners, optimization_profiles,
                                           parser_failures, sparse_weight_nodes, trt_supports)
from kiln.errors import ArtifactError, BackendError, BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.types import DTYPE_NAMES, DTYPES, DeviceKind, Precision

INSTALL_HINT = "pip install tensorrt; it needs an NVIDIA GPU with its CUDA driver and a CUDA build of torch"
# trt.DataType member name -> torch dtype, for the engine's I/O tensors
TORCH_DTYPE = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
               "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8,
               "FP8": torch.float8_e4m3fn}


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
    """A TensorRT logger that keeps errors, so a failed build says why."""

    class Log(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))

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
        self._dtype = {n: TORCH_DTYPE[self._engine.get_tensor_dtype(n).name] for n in names}
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
        from kiln.backends.onnxruntime import export_onnx

        trt = _import_trt()
        onnx_path = settings.workdir / f"{partition.name}.tensorrt.onnx"
        program = export_onnx(partition, onnx_path)
        owners = onnx_node_owners(program, partition.gm)
        plan = PrecisionPlan(settings.precision, layer_precisions(partition.gm, owners, settings.precision),
                             explicit_quantization=has_qdq(n.op_type for n in program.model.graph),
                             sparse_layers=sparse_weight_nodes(partition.gm))
        engine_path = settings.workdir / f"{partition.name}.plan"
        config = derive_build_config(settings.device, plan,
                                     optimization_profiles(partition.input_names, partition.example_inputs, partition.dynamic_shapes),
                                     engine_path, trt_major=int(trt.__version__.split(".")[0]))
        engine_path.write_bytes(_build(trt, onnx_path, config, owners, partition.name))
        facts = EngineFacts(trt.__version__, tuple(torch.cuda.get_device_capability()), torch.cuda.get_device_name(),
                            config.hardware_compatibility, config.version_compatible)
        io = {"inputs": list(partition.input_names), "outputs": list(partition.output_names),
              "output_dtypes": _output_dtypes(partition)}
        engine = TensorRTEngine(engine_path, facts, io, config.to_meta())
        engine.summary = _summary(engine_path, facts, config, settings.device)
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


def _output_dtypes(partition: PartitionGraph) -> list[str]:
    output = next(n for n in partition.gm.graph.nodes if n.op == "output")
    values = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    return [DTYPE_NAMES[v.meta["val"].dtype] for v in values]


def _summary(engine_path: Path, facts: EngineFacts, config: TrtBuildConfig, device: DeviceSpec) -> str:
    parts = [f"TensorRT {facts.tensorrt} engine {engine_path.stat().st_size / 1e6:.1f} MB for {facts.gpu} "
             f"(compute capability {facts.compute_capability[0]}.{facts.compute_capability[1]})",
             f"flags {', '.join(sorted(config.flags)) or 'none'}", "strongly typed" if config.strongly_typed else "weakly typed"]
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
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if config.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        failures = parser_failures([_parser_error(e) for e in errors], owners)
        listed = "; ".join(f"node {node}: {support.reason}" for node, support in list(failures.items())[:3])
        error = BackendError(f"TensorRT's ONNX parser refused {len(failures)} node(s): {listed}", where=f"partition {partition}",
                             fix="use another backend for this partition (the profile's next preference)")
        error.unsupported = failures
        raise error
    builder_config = builder.create_builder_config()
    _apply_config(trt, builder, builder_config, network, config)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise BackendError(f"TensorRT's builder failed: {'; '.join(logger.errors[-3:]) or 'no error logged'}",
                           where=f"partition {partition}", fix="use another backend for this partition, or report the model")
    config.timing_cache.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    return bytes(serialized)


def _parser_error(error) -> ParserError:
    # node_name/node_operator arrived in TensorRT 8.6; older parsers give the node index only
    name = error.node_name() if hasattr(error, "node_name") else f"#{error.node()}"
    op = error.node_operator() if hasattr(error, "node_operator") else ""
    return ParserError(name, op, error.desc())


def _apply_config(trt, builder, builder_config, network, config: TrtBuildConfig) -> None:
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
    if config.calibration_cache is not None:
        builder_config.int8_calibrator = _cache_calibrator(trt, config.calibration_cache.read_bytes())
    _constrain_layers(trt, network, config)


def _constrain_layers(trt, network, config: TrtBuildConfig) -> int:
    """Pin the layers of each ONNX node in config.layer_precisions to that precision."""
    if not config.layer_precisions:
        return 0
    floats = {trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        owner = layer_owner(layer.name, getattr(layer, "metadata", ""), config.layer_precisions)
        if owner is None:
            continue
        dtype = getattr(trt.DataType, TRT_DATATYPE[config.layer_precisions[owner]])
        layer.precision = dtype
        for output in range(layer.num_outputs):
            if layer.get_output(output).dtype in floats:
                layer.set_output_type(output, dtype)
        pinned += 1
    return pinned


def _cache_calibrator(trt, cache: bytes):
    """An int8 calibrator that only replays a calibration cache (no calibration data needed)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None

        def read_calibration_cache(self):
            return cache

        def write_calibration_cache(self, data):
            return None

    return CacheCalibrator()
