"""Hardware profiles: the typed schema (the kind) and its strict YAML loader.

Each YAML file in this folder is one named instance. A profile names its devices (kind,
memory, bandwidth, peak throughput per precision, backend preference), the links between
them, and how kiln picks a backend (`prefer` the first available, or `measure` them all).
`extends: other` merges another profile underneath (mappings merge key by key, the child
wins). Unknown keys, wrong types and missing fields raise ProfileError naming the file, the
dotted field and, for typos, the closest known field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kiln.errors import ProfileError
from kiln.ir import BACKEND_NAMES
from kiln.types import SPARSITY_PATTERNS, DeviceKind, Precision

PROFILE_DIR = Path(__file__).parent
SELECT_MODES = ("prefer", "measure")
# Estimates, not measurements: an op dispatch on a CPU runtime costs about a microsecond or two,
# a CUDA kernel launch about 5 us, an NPU job submission tens of us (`kiln profile-host`
# measures the CPU figure).
DEFAULT_LAUNCH_OVERHEAD_US = {DeviceKind.CPU: 2.0, DeviceKind.GPU: 5.0, DeviceKind.NPU: 20.0}


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    kind: DeviceKind
    model: str
    memory_gb: float
    memory_bandwidth_gbs: float
    peak_tflops: dict[Precision, float]  # dense throughput per precision (TOPS for integer types)
    backends: tuple[str, ...]  # preference order for partitions placed on this device
    cores: int | None = None
    features: tuple[str, ...] = ()
    # Fixed cost per kernel (dispatch, launch, synchronisation), for kiln's cost model. Profiles
    # may leave it out: DEFAULT_LAUNCH_OVERHEAD_US then gives an estimate per device kind.
    launch_overhead_us: float | None = None
    # Fine-grained structured sparsity patterns the device's matrix units skip work on, e.g.
    # ("2:4",) for NVIDIA's sparse tensor cores (Ampere and later); () for none.
    structured_sparsity: tuple[str, ...] = ()

    @property
    def launch_overhead_s(self) -> float:
        us = self.launch_overhead_us if self.launch_overhead_us is not None else DEFAULT_LAUNCH_OVERHEAD_US[self.kind]
        return us * 1e-6

    @property
    def precisions(self) -> frozenset[Precision]:
        return frozenset(self.peak_tflops)


@dataclass(frozen=True)
class LinkSpec:
    source: str
    target: str
    bandwidth_gbs: float
    latency_us: float


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    devices: dict[str, DeviceSpec]
    primary_device: str
    select: str  # "prefer" | "measure"
    links: tuple[LinkSpec, ...]
    source_file: str
    digest: str  # sha256 of the resolved profile, recorded in artifacts and cache keys

    @property
    def primary(self) -> DeviceSpec:
        return self.devices[self.primary_device]

    @property
    def precisions(self) -> frozenset[Precision]:
        return frozenset().union(*(d.precisions for d in self.devices.values()))

    def summary(self) -> str:
        lines = [f"{self.name}: {self.description}", f"  primary device: {self.primary_device}, backend selection: {self.select}"]
        for dev in self.devices.values():
            peaks = ", ".join(f"{p.value} {v:g}" for p, v in dev.peak_tflops.items())
            lines.append(f"  {dev.name} ({dev.kind.value}) {dev.model}: {dev.memory_gb:g} GB at {dev.memory_bandwidth_gbs:g} GB/s")
            lines.append(f"    peak T(FL)OPS: {peaks}")
            lines.append(f"    backends: {', '.join(dev.backends)}")
            if dev.features:
                lines.append(f"    features: {', '.join(dev.features)}")
            if dev.structured_sparsity:
                lines.append(f"    structured sparsity: {', '.join(dev.structured_sparsity)}")
        for link in self.links:
            lines.append(f"  link {link.source} -> {link.target}: {link.bandwidth_gbs:g} GB/s, {link.latency_us:g} us")
        return "\n".join(lines)


# Field tables: name -> (python type for checking, required). Kept beside the dataclasses so
# a new field is one line in each.
_TOP_FIELDS = {"name": (str, True), "description": (str, True), "extends": (str, False),
               "devices": (dict, True), "primary_device": (str, True), "select": (str, False),
               "links": (list, False)}
_DEVICE_FIELDS = {"kind": (str, True), "model": (str, True), "memory_gb": ((int, float), True),
                  "memory_bandwidth_gbs": ((int, float), True), "peak_tflops": (dict, True),
                  "backends": (list, True), "cores": (int, False), "features": (list, False),
                  "launch_overhead_us": ((int, float), False), "structured_sparsity": (list, False)}
_LINK_FIELDS = {"from": (str, True), "to": (str, True), "bandwidth_gbs": ((int, float), True),
                "latency_us": ((int, float), True)}


def available() -> list[str]:
    """Names of the profiles shipped with kiln (files starting with '_' are bases)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def load(name_or_path: str | Path) -> Profile:
    """Load a shipped profile by name, or a user profile from a YAML path."""
    path = _resolve(name_or_path)
    raw = _read_with_extends(path, seen=())
    return _build(raw, path)


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise ProfileError("profile file not found", where=str(path), fix="check the path, or use a shipped profile name: " + ", ".join(available()))
        return path
    path = PROFILE_DIR / f"{text}.yaml"
    if not path.is_file() or text.startswith("_"):
        known = available()
        close = difflib.get_close_matches(text, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ProfileError(f"unknown profile {text!r}", fix=f"{hint}known profiles: {', '.join(known)}; or pass a path to a YAML file")
    return path


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict:
    if path in seen:
        raise ProfileError("profile extends itself in a cycle", where=f"{path.name}: extends", fix=" -> ".join(p.name for p in (*seen, path)))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ProfileError(f"not valid YAML ({exc})".replace("\n", " "), where=str(path), fix="fix the YAML syntax at the line shown") from None
    if not isinstance(data, dict):
        raise ProfileError("a profile must be a YAML mapping", where=str(path), fix="start the file with 'name: ...'")
    parent = data.get("extends")
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ProfileError("must be a profile name", where=f"{path.name}: extends", fix="write extends: <profile name>")
    parent_path = path.parent / f"{parent}.yaml"
    shipped = PROFILE_DIR / f"{parent}.yaml"
    # a user file may extend the shipped profile of its own name (my/a100.yaml: extends: a100)
    if not parent_path.is_file() or (parent_path.resolve() == path.resolve() and shipped.is_file()):
        parent_path = shipped
    if not parent_path.is_file():
        raise ProfileError(f"extends unknown profile {parent!r}", where=f"{path.name}: extends", fix="name a profile in the same folder or a shipped one")
    base = _read_with_extends(parent_path, (*seen, path))
    base = {k: v for k, v in base.items() if k != "extends"}
    return _merge(base, {k: v for k, v in data.items() if k != "extends"})


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base.get(key), value) if key in base else value
        return out
    return override


def _check_fields(data: Any, table: dict, where: str, path: Path) -> None:
    if not isinstance(data, dict):
        raise ProfileError("must be a mapping", where=f"{path.name}: {where}", fix="write it as 'key: value' lines")
    for key in data:
        if key not in table:
            close = difflib.get_close_matches(str(key), list(table), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(table)}"
            raise ProfileError("unknown field", where=f"{path.name}: {where + '.' if where else ''}{key}", fix=hint)
    for key, (kind, required) in table.items():
        dotted = f"{path.name}: {where + '.' if where else ''}{key}"
        if key not in data:
            if required:
                raise ProfileError("missing required field", where=dotted, fix=f"add '{key}:'")
            continue
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else "number"
            raise ProfileError(f"expected {expected}, got {type(value).__name__} {value!r}", where=dotted, fix=f"write {key} as a {expected}")


def _build(raw: dict, path: Path) -> Profile:
    _check_fields(raw, _TOP_FIELDS, "", path)
    devices = {name: _build_device(name, spec, path) for name, spec in raw["devices"].items()}
    if not devices:
        raise ProfileError("no devices", where=f"{path.name}: devices", fix="declare at least one device")
    if raw["primary_device"] not in devices:
        raise ProfileError("names no declared device", where=f"{path.name}: primary_device",
                           fix=f"use one of {', '.join(devices)}")
    select = raw.get("select", "prefer")
    if select not in SELECT_MODES:
        raise ProfileError(f"unknown selection mode {select!r}", where=f"{path.name}: select", fix=f"use one of {', '.join(SELECT_MODES)}")
    links = tuple(_build_link(i, link, devices, path) for i, link in enumerate(raw.get("links", [])))
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()
    return Profile(raw["name"], raw["description"], devices, raw["primary_device"], select, links, str(path), digest)


def _build_device(name: str, spec: Any, path: Path) -> DeviceSpec:
    where = f"devices.{name}"
    _check_fields(spec, _DEVICE_FIELDS, where, path)
    try:
        kind = DeviceKind(spec["kind"])
    except ValueError:
        raise ProfileError(f"unknown device kind {spec['kind']!r}", where=f"{path.name}: {where}.kind",
                           fix=f"use one of {', '.join(k.value for k in DeviceKind)}") from None
    peaks: dict[Precision, float] = {}
    for key, value in spec["peak_tflops"].items():
        try:
            precision = Precision.parse(str(key))
        except ValueError as exc:
            raise ProfileError(str(exc), where=f"{path.name}: {where}.peak_tflops.{key}", fix="name a known precision") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ProfileError(f"expected a positive number, got {value!r}", where=f"{path.name}: {where}.peak_tflops.{key}", fix="write the datasheet figure in TFLOPS (TOPS for int)")
        peaks[precision] = float(value)
    if not peaks:
        raise ProfileError("no precisions", where=f"{path.name}: {where}.peak_tflops", fix="list at least fp32")
    backends = spec["backends"]
    if not backends or not all(isinstance(b, str) for b in backends):
        raise ProfileError("must be a non-empty list of backend names", where=f"{path.name}: {where}.backends", fix="for example [onnxruntime, inductor]")
    for backend in backends:
        if backend not in BACKEND_NAMES:
            close = difflib.get_close_matches(backend, list(BACKEND_NAMES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ProfileError(f"unknown backend {backend!r}", where=f"{path.name}: {where}.backends", fix=f"{hint}known backends: {', '.join(BACKEND_NAMES)}")
    for key in ("memory_gb", "memory_bandwidth_gbs"):
        if spec[key] <= 0:
            raise ProfileError(f"must be positive, got {spec[key]!r}", where=f"{path.name}: {where}.{key}", fix="write the datasheet figure")
    if spec.get("launch_overhead_us", 0) < 0:
        raise ProfileError(f"must not be negative, got {spec['launch_overhead_us']!r}", where=f"{path.name}: {where}.launch_overhead_us",
                           fix="write microseconds per kernel launch, e.g. 5")
    return DeviceSpec(name, kind, spec["model"], float(spec["memory_gb"]), float(spec["memory_bandwidth_gbs"]), peaks,
                      tuple(backends), spec.get("cores"), tuple(str(f) for f in spec.get("features", ())),
                      None if spec.get("launch_overhead_us") is None else float(spec["launch_overhead_us"]),
                      _sparsity_patterns(spec.get("structured_sparsity", []), f"{path.name}: {where}.structured_sparsity"))


def _sparsity_patterns(patterns: list, where: str) -> tuple[str, ...]:
    for pattern in patterns:
        if pattern not in SPARSITY_PATTERNS:
            close = difflib.get_close_matches(str(pattern), SPARSITY_PATTERNS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ProfileError(f"unknown structured sparsity pattern {pattern!r}", where=where,
                               fix=f"{hint}known patterns: {', '.join(SPARSITY_PATTERNS)} (quote it: \"2:4\")")
    return tuple(patterns)


def _build_link(index: int, link: Any, devices: dict, path: Path) -> LinkSpec:
    where = f"links[{index}]"
    _check_fields(link, _LINK_FIELDS, where, path)
    for end in ("from", "to"):
        if link[end] not in devices:
            raise ProfileError(f"names no declared device {link[end]!r}", where=f"{path.name}: {where}.{end}", fix=f"use one of {', '.join(devices)}")
    return LinkSpec(link["from"], link["to"], float(link["bandwidth_gbs"]), float(link["latency_us"]))
