"""The eager pseudo-backend: a partition of ops no other backend supports, run by PyTorch itself.

Placement sends an op here only when no backend on any device takes it, and the report names
the op. The engine is the partition's fx GraphModule. It is saved as a torch.export program
(.pt2: graph as JSON, weights as raw bytes) with the sample inputs member emptied and every
payload checked to need no pickle, so the artifact reloads without the model's Python source
and without unpickling anything. Custom ops (torch.library) are looked up by name when the
program loads: import the library that registers them before `kiln.load`.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import ClassVar

import torch

from kiln.backends.base import (Availability, BackendBase, BackendSettings, CapabilityTable, EngineEntry, export_partition)
from kiln.ir import PartitionGraph
from kiln.errors import BackendError
from kiln.types import DeviceKind, Precision

# PyTorch runs every op at every precision; kiln runs eager partitions on the host CPU only.
CAPABILITIES = CapabilityTable("eager", {DeviceKind.CPU: frozenset(Precision)})


class EagerEngine:
    backend = "eager"

    def __init__(self, program: torch.export.ExportedProgram):
        self.program = program
        self.module = program.module()
        self.summary = "runs in eager PyTorch: " + ", ".join(sorted(_ops(self.module)))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.module(*inputs)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    def save(self, directory: Path, stem: str) -> EngineEntry:
        target = directory / f"{stem}.pt2"
        buffer = io.BytesIO()
        program = self.program
        torch.export.save(program, buffer)
        _without_pickles(buffer.getvalue(), target)
        return EngineEntry(self.backend, [target.name], {"torch": torch.__version__, "ops": sorted(_ops(self.module))})


def _ops(module: torch.nn.Module) -> set[str]:
    return {str(n.target) for n in module.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}


def _without_pickles(data: bytes, target: Path) -> None:
    """Copy the .pt2 archive, emptying the pickled sample inputs (torch.export.load treats an
    empty member as none) and refusing payloads that would need unpickling."""
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for name in source.namelist():
            payload = source.read(name)
            if "/sample_inputs/" in name:
                payload = b""
            elif name.endswith("_config.json") and _uses_pickle(payload):
                raise BackendError("the eager partition holds an object torch.export can only pickle", where=name,
                                   fix="keep such objects (script objects, opaque constants) out of the model's forward")
            out.writestr(name, payload)


def _uses_pickle(payload: bytes) -> bool:
    config = json.loads(payload).get("config", {})
    return any(entry.get("use_pickle") for entry in config.values() if isinstance(entry, dict))


def _check_no_pickle(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/sample_inputs/" in name and archive.getinfo(name).file_size:
                raise BackendError("eager engine carries pickled sample inputs", where=str(path), fix="rebuild the artifact")
            if name.endswith("_config.json") and _uses_pickle(archive.read(name)):
                raise BackendError("eager engine needs unpickling to load", where=str(path), fix="rebuild the artifact")


class EagerBackend(BackendBase):
    name: ClassVar[str] = "eager"
    capabilities: ClassVar[CapabilityTable] = CAPABILITIES

    def available(self) -> Availability:
        return Availability(True, version=torch.__version__)

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> EagerEngine:
        try:
            return EagerEngine(export_partition(partition))
        except Exception as exc:
            raise BackendError(f"could not export the eager partition: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                               where=f"partition {partition.name}", fix="report the model") from exc

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> EagerEngine:
        path = directory / entry.files[0]
        _check_no_pickle(path)
        try:
            program = torch.export.load(path)
        except Exception as exc:
            ops = ", ".join(entry.meta.get("ops", []))
            raise BackendError(f"could not load the eager partition ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                               where=str(path), fix=f"it runs {ops}: import the library registering any custom op "
                                                    "(torch.library) before kiln.load") from exc
        return EagerEngine(program)
