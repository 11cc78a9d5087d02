"""The protocol every backend implements, and the small data types it speaks in.

A backend says whether its runtime is here (`available`), which ops it takes on which device
at which precisions (`supports`, read from a capability table keyed by ATen overloads),
builds an Engine for a partition (`compile`), and loads a saved engine (`load`). Engines are
callables over flat tensors that save themselves as files listed in the artifact manifest.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Mapping, Protocol

import torch
from torch.fx import Node

from kiln.budget import Budget
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.ir import PartitionGraph
from kiln.types import DeviceKind, Precision


def place_engine_file(source: Path, target: Path) -> None:
    """Put an engine file where its engine is being saved. A save into a folder inside the
    file's own build folder (an isolated build handing its engine to the parent) links the file
    instead of writing the weights again (BERT-base's 436 MB took a second to copy); any other
    save copies, so an artifact never shares a file with the cache or another artifact."""
    if target.resolve().parent.is_relative_to(source.resolve().parent):
        try:
            os.link(source, target)
            return
        except OSError:  # another file system, or links not allowed: copy
            pass
    shutil.copyfile(source, target)


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    install_hint: str = ""
    version: str = ""


@dataclass(frozen=True)
class Support:
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class OpSupport:
    """One capability-table entry: the precisions an op runs at, and an optional check that
    returns why a particular node cannot run (None when it can)."""

    precisions: frozenset[Precision]
    check: Callable[[Node], str | None] | None = None


@dataclass(frozen=True)
class CapabilityTable:
    """Everything kiln knows about what one backend runs: the device kinds it drives, the
    precisions kiln lowers to fast kernels on each kind, per-op limits, and the runtime's own op
    coverage. Placement, backend selection and the precision pass all ask this one table, so
    they cannot disagree about a backend.

    A node runs at precision p on a device when: the device's kind is listed, this machine has
    it (unless only planning), p is among that kind's precisions and among the op's (its `ops`
    entry, else `default`), the entry's check passes, and `coverage` (the exporter's registry,
    a frontend's op table) takes the node."""

    backend: str  # the backend's name, for refusals
    precisions: Mapping[DeviceKind, frozenset[Precision]]
    ops: Mapping[object, OpSupport] = field(default_factory=dict)  # torch.ops.aten.*.<overload> -> OpSupport
    default: OpSupport | None = None  # for ops not listed; None: every precision of the device's kind
    coverage: Callable[[Node], Support] | None = None  # the runtime's own per-node answer; None: every op
    # Whether this machine can run the device at all (e.g. a GPU profile on a CPU-only host).
    device_ready: Callable[[DeviceSpec], str | None] | None = None
    # The sets of precisions one partition's plan may combine (int8 layers with bf16 ones, say),
    # per device kind; a plan of one precision below fp32 (beside fp32 layers) needs no entry.
    mixes: Mapping[DeviceKind, frozenset[frozenset[Precision]]] = field(default_factory=dict)

    def runs(self, kind: DeviceKind, precision: Precision) -> bool:
        """Whether kiln lowers `precision` to this backend's kernels on `kind` devices."""
        return precision in self.precisions.get(kind, frozenset())

    def runs_mixed(self, kind: DeviceKind, precisions: frozenset[Precision]) -> bool:
        """Whether kiln lowers a plan combining `precisions` (each below fp32) in one partition."""
        return frozenset(precisions) in self.mixes.get(kind, frozenset())

    def supports(self, node: Node, device: DeviceSpec, precision: Precision = Precision.FP32, check_ready: bool = True) -> Support:
        """Whether `node` runs on `device` at `precision`; check_ready=False asks the table alone,
        for planning a device this machine does not have."""
        if device.kind not in self.precisions:
            kinds = ", ".join(sorted(k.value for k in self.precisions))
            return Support(False, f"{self.backend} runs on {kinds} devices, not {device.kind.value}")
        if check_ready and self.device_ready is not None and (reason := self.device_ready(device)) is not None:
            return Support(False, reason)
        if not self.runs(device.kind, precision):
            lowered = ", ".join(p.value for p in Precision if self.runs(device.kind, p))
            return Support(False, f"kiln's {self.backend} path does not lower {precision.value} on {device.kind.value} "
                                  f"(it lowers {lowered} there)")
        if node.op != "call_function":
            return Support(True)
        entry = self.ops.get(node.target, self.default)
        if entry is not None:
            if precision not in entry.precisions:
                return Support(False, f"{node.target} does not run at {precision.value} on {self.backend}")
            if entry.check is not None and (reason := entry.check(node)) is not None:
                return Support(False, reason)
        return self.coverage(node) if self.coverage is not None else Support(True)


class BackendBase:
    """What every backend shares: its answer to "does this node run here" is its table's."""

    name: ClassVar[str]
    capabilities: ClassVar[CapabilityTable]
    # the libraries a build imports, which a build worker imports ahead (kiln/build/isolate.py)
    build_modules: ClassVar[tuple[str, ...]] = ()
    # whether its load keeps what it compiled in BackendSettings.runtime_cache, so the compile
    # cache loads a new entry once to fill it
    keeps_compiled: ClassVar[bool] = False

    def supports(self, node: Node, device: DeviceSpec, precision: Precision = Precision.FP32,
                 check_ready: bool = True) -> Support:
        return self.capabilities.supports(node, device, precision, check_ready)


@dataclass(frozen=True)
class BackendSettings:
    """What a build may read: the device it targets, threads, and a scratch directory.
    `precision` is the lowest precision the partition's plan uses (its element-wise tolerance);
    `budget`, set when layers are lowered, is what the engine's outputs are checked against."""

    device: DeviceSpec
    threads: int
    workdir: Path
    precision: Precision = Precision.FP32
    fuse: bool = True  # lower into the runtime's fused ops (CompileOptions.fusion)
    autotune: bool = False  # CompileOptions.autotune: search kernel variants at build time
    budget: Budget | None = None
    # Where a load may keep what its runtime compiled from the engine's files, for the next load
    # of the same files at the same place (a compile-cache entry's; None for artifacts the user
    # loads, which may move). Only backends with keeps_compiled use it.
    runtime_cache: Path | None = None


@dataclass
class EngineEntry:
    """One engine's files inside the artifact, as the manifest lists them (with their sha256s
    when read from an artifact, checked before the engine loads)."""

    backend: str
    files: list[str]
    meta: dict = field(default_factory=dict)
    sha256: tuple[str, ...] = ()


class Engine(Protocol):
    backend: str

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def save(self, directory: Path, stem: str) -> EngineEntry: ...


class Backend(Protocol):
    name: ClassVar[str]
    capabilities: ClassVar[CapabilityTable]
    # the libraries a build imports, which a build worker imports ahead (kiln/build/isolate.py)
    build_modules: ClassVar[tuple[str, ...]] = ()
    # whether its load keeps what it compiled in BackendSettings.runtime_cache, so the compile
    # cache loads a new entry once to fill it
    keeps_compiled: ClassVar[bool] = False

    def available(self) -> Availability: ...

    def supports(self, node: Node, device: DeviceSpec, precision: Precision = Precision.FP32,
                 check_ready: bool = True) -> Support: ...

    def compile(self, partition: PartitionGraph, settings: BackendSettings) -> Engine: ...

    def load(self, directory: Path, entry: EngineEntry, settings: BackendSettings) -> Engine: ...


def export_partition(partition: PartitionGraph) -> torch.export.ExportedProgram:
    """Re-export a partition's fx graph so runtimes that start from torch.export get one."""
    from kiln.frontend.capture import export_program

    return export_program(partition.gm, partition.example_inputs, partition.dynamic_shapes)
