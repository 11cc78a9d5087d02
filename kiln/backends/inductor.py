"""TorchInductor backend: AOTInductor compiles the captured program ahead of time into a
.pt2 package (generated C++/OpenMP kernels plus a shared library) that runs in-process and
is the saved engine, so what runs now is exactly what reloads later.

Compiling takes tens of seconds per model here (mostly the C++ compiler); kiln's selection
counts that time in the report. Inductor's own caches make a second compile of the same
graph much faster.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import torch
from torch.fx import Node

from kiln.backends.base import (Availability, BackendSettings, CapabilityTable, EngineEntry, OpSupport,
                                PartitionGraph, Support)
from kiln.backends.inductor_precision import lowered_program
from kiln.errors import BackendError, BackendUnavailable
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.types import Precision

# Inductor lowers every ATen op (falling back to ATen kernels where it has no codegen), so the
# table's default covers all ops; entries here would only narrow it.
CAPABILITIES = CapabilityTable(
    ops={},
    default=OpSupport(frozenset({Precision.FP32, Precision.BF16, Precision.FP16, Precision.INT8})),
    device_kinds=frozenset({"cpu", "gpu"}),
    device_ready=lambda device: (f"device {device.name}: kiln's Inductor backend builds CPU engines only so far"
                                 if device.kind.value == "gpu" else None),
)


class InductorEngine:
    backend = "inductor"

    def __init__(self, package_path: Path):
        self.package_path = package_path
        self.summary = ""
        try:
            self.runner = torch._inductor.aoti_load_package(str(package_path))
        except Exception as exc:
            raise BackendError(f"AOTInductor could not load the package: {exc}", where=str(package_path),
                               fix="rebuild the artifact with this torch version") from exc

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.runner(*inputs)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    def save(self, directory: Path, stem: str) -> EngineEntry:
        target = directory / f"{stem}.pt2"
        shutil.copyfile(self.package_path, target)
        return EngineEntry(self.backend, [target.name], {"torch": torch.__version__})


def _configs(settings: BackendSettings) -> dict:
    # freezing: weights become constants, so Inductor folds them and prepacks GEMM weights
    # for oneDNN (about 5% on MiniLM here); cpp.threads: the build's thread budget.
    return {"freezing": True, "cpp.threads": settings.threads}


class InductorBackend:
    name: ClassVar[str] = "inductor"
    capabilities: ClassVar[CapabilityTable] = CAPABILITIES

    def available(self) -> Availability:
        try:
            from torch._inductor import aoti_compile_and_package  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"this torch has no AOTInductor ({exc})", "pip install torch>=2.6")
        if shutil.which("c++") is None and shutil.which("g++") is None:
            return Availability(False, "no C++ compiler on PATH (Inductor generates C++ on CPU)", "apt-get install g++")
        return Availability(True, version=torch.__version__)

    def supports(self, node: Node, device: DeviceSpec, precision: Precision = Precision.FP32) -> Support:
        from kiln.precision.capability import backend_runs

        if precision is not Precision.FP32 and not backend_runs(self.name, device, precision):
            return Support(False, f"kiln's Inductor path does not lower {precision.value} on {device.kind.value} "
                                  "(it lowers bf16 and int8 on CPU)")
        return self.capabilities.supports(node, device, precision)

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> InductorEngine:
        status = self.available()
        if not status.ok:
            raise BackendUnavailable(f"Inductor backend unavailable: {status.reason}", fix=status.install_hint)
        path = settings.workdir / f"{partition.name}.pt2"
        try:
            exported, lowered = lowered_program(partition)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                     inductor_configs=_configs(settings))
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"AOTInductor failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                               where=f"partition {partition.name}", fix="try backend='onnxruntime'") from exc
        engine = InductorEngine(path)
        engine.summary = f"AOTInductor package {path.stat().st_size / 1e6:.1f} MB" + (f"; {lowered}" if lowered else "")
        return engine

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> InductorEngine:
        return InductorEngine(directory / entry.files[0])
