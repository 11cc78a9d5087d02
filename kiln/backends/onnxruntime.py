"""ONNX Runtime backend: export through torch.onnx (dynamo exporter) from the captured
program, run in an InferenceSession with ORT's full graph optimisation.

Session options come from the build settings (intra-op threads, ORT_ENABLE_ALL). The CPU
execution provider runs here; CUDA and TensorRT providers are requested first when the
installed onnxruntime offers them and the partition targets a GPU. The capability table is
the ONNX exporter's own registry of ATen overloads (plus ops it decomposes first), so kiln's
coverage answer is the exporter's, not a hand-kept copy.
"""

from __future__ import annotations

import functools
import logging
import shutil
import threading
from pathlib import Path
from typing import ClassVar

import torch
from torch.fx import Node

from kiln.backends.base import (Availability, BackendSettings, CapabilityTable, EngineEntry, OpSupport,
                                PartitionGraph, Support, export_partition)
from kiln.errors import BackendError, BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.types import DeviceKind, Precision

FLOAT_PRECISIONS = frozenset({Precision.FP32, Precision.FP16})
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
OPSET = 20


class _ExporterTable(CapabilityTable):
    """The exporter's registry viewed as a capability table (built on first use)."""

    def supports(self, node: Node, device: DeviceSpec, precision: Precision = Precision.FP32) -> Support:
        if node.op != "call_function":
            return Support(True)
        target = node.target
        if not isinstance(target, torch._ops.OpOverload):
            return Support(True)  # operator.getitem and friends export as tuple plumbing
        if precision not in FLOAT_PRECISIONS:
            return Support(False, f"kiln's ONNX Runtime path does not lower {precision.value} yet")
        if _exporter_registry().is_registered(target) or target in _decompositions():
            return Support(True)
        return Support(False, f"the ONNX exporter has no conversion for {target}")


@functools.cache
def _exporter_registry():
    from torch.onnx._internal.exporter import _registration

    # The registry logs one warning per torchvision op when torchvision is absent; not kiln's news.
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    quiet = lambda record: "torchvision" not in record.getMessage()  # noqa: E731
    log.addFilter(quiet)
    try:
        return _registration.ONNXRegistry.from_torchlib()
    finally:
        log.removeFilter(quiet)


@functools.cache
def _decompositions():
    return frozenset(torch._decomp.core_aten_decompositions())


class OnnxRuntimeEngine:
    backend = "onnxruntime"

    def __init__(self, model_path: Path, settings: BackendSettings, output_names: tuple[str, ...]):
        import onnxruntime as ort

        self.model_path = model_path
        self.output_names = output_names
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = settings.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise
        providers = [p for p in _providers_for(settings.device) if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:
            raise BackendError(f"ONNX Runtime could not load the exported model: {exc}", where=str(model_path),
                               fix="try backend='inductor', or report the model") from exc
        self.providers = tuple(self.session.get_providers())
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self._lock = threading.Lock()  # InferenceSession.run is thread-safe; the lock guards nothing else

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: t.detach().contiguous().numpy() for name, t in zip(self.input_names, inputs)}
        outputs = self.session.run(None, feeds)
        return tuple(torch.from_numpy(o) for o in outputs)

    def save(self, directory: Path, stem: str) -> EngineEntry:
        target = directory / f"{stem}.onnx"
        shutil.copyfile(self.model_path, target)
        extra = [p for p in self.model_path.parent.glob(self.model_path.name + ".data")]
        files = [target.name]
        for data in extra:  # external weights of models over 2 GB keep their file name
            shutil.copyfile(data, directory / data.name)
            files.append(data.name)
        return EngineEntry(self.backend, files, {"providers": list(self.providers), "opset": OPSET})


def _providers_for(device: DeviceSpec) -> list[str]:
    if device.kind is DeviceKind.GPU:
        return [*GPU_PROVIDERS, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    name: ClassVar[str] = "onnxruntime"
    capabilities: ClassVar[CapabilityTable] = _ExporterTable(ops={}, device_kinds=frozenset({"cpu", "gpu", "npu"}))

    def available(self) -> Availability:
        try:
            import onnx  # noqa: F401
            import onnxruntime
            import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        except ImportError as exc:
            return Availability(False, f"{exc.name} is not installed", "pip install onnxruntime onnx onnxscript")
        return Availability(True, version=onnxruntime.__version__)

    def supports(self, node: Node, device: DeviceSpec) -> Support:
        return self.capabilities.supports(node, device)

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> OnnxRuntimeEngine:
        self._require()
        exported = export_partition(partition)
        path = settings.workdir / f"{partition.name}.onnx"
        try:
            program = torch.onnx.export(exported, (), dynamo=True, opset_version=OPSET,
                                        input_names=list(partition.input_names),
                                        output_names=list(partition.output_names), verbose=False)
            program.save(str(path))
        except Exception as exc:
            raise BackendError(f"the ONNX exporter failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                               where=f"partition {partition.name}", fix="try backend='inductor'") from exc
        return OnnxRuntimeEngine(path, settings, partition.output_names)

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> OnnxRuntimeEngine:
        self._require()
        return OnnxRuntimeEngine(directory / entry.files[0], settings, tuple(entry.meta.get("output_names", ())))

    def _require(self) -> None:
        status = self.available()
        if not status.ok:
            raise BackendUnavailable(f"ONNX Runtime backend unavailable: {status.reason}", fix=status.install_hint)
