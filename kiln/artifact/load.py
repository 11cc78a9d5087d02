"""Read an artifact: integrity and compatibility first, engines only after every check passed."""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import torch
import torch.utils._pytree as pytree

from kiln.artifact.manifest import MANIFEST, MANIFEST_MAX_BYTES, engine_member, read_manifest, safe_member, sha256_file
from kiln.backends import registry
from kiln.backends.base import BackendSettings, EngineEntry
from kiln.errors import ArtifactError, BackendUnavailable, KilnError
from kiln.hardware_profiles.schema import DeviceSpec
from kiln.host import usable_cores
from kiln.ir import Partition, PartitionGraph, PartitionPlan
from kiln.report import Report
from kiln.types import DeviceKind, InputSpec, Precision


@dataclass
class LoadedArtifact:
    """What an artifact holds, checked and with its engines loaded; `close` removes the files
    the engines were loaded from (call it once nothing runs them any more)."""

    plan: PartitionPlan
    engines: dict
    input_spec: InputSpec
    output_structure: str
    report: Report
    profile: dict
    output_none_positions: tuple[int, ...]
    close: Callable[[], None]


def read(path: str | Path, threads: int | None = None, expected_digest: str | None = None,
         runtime_cache: Path | None = None) -> LoadedArtifact:
    """Read an artifact written by CompiledModel.save; raises ArtifactError when it is corrupt,
    tampered with, or needs other versions than the ones installed.

    expected_digest: the artifact's digest as printed by `kiln inspect` (or
    `kiln.artifact.digest(path)`) when it was built. The digest is the sha256 of the manifest,
    which lists every engine file's sha256, so pinning it refuses any edited artifact, not only
    corrupt ones. Keep the digest somewhere the artifact's supplier cannot change it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ArtifactError("no such file or directory", where=str(path), fix="check the path")
    cleanup = lambda: None  # noqa: E731  (replaced once a zip is being extracted)
    try:
        manifest_bytes = _manifest_bytes(path)
        _check_digest(manifest_bytes, expected_digest, path)
        manifest = read_manifest(manifest_bytes, where=str(path))
        _check_versions(manifest, path)
        sizes = _listed_files(manifest, path)
        if path.is_dir():
            directory = path
        else:
            directory = Path(tempfile.mkdtemp(prefix="kiln-load-"))
            cleanup = lambda: shutil.rmtree(directory, ignore_errors=True)  # noqa: E731
            _extract(path, sizes, directory)
        # The runtimes' imports (tenths of a second, mostly Python) overlap the checksums (hashing
        # runs without the GIL); no engine file is read before its checksum passes.
        importing = threading.Thread(target=_import_backends, args=(manifest,), daemon=True)
        importing.start()
        entries = _check_files(manifest, directory, path)
        importing.join()
        _check_no_unlisted_files(manifest, directory, path)
        # Everything that can be parsed is parsed before any engine (native code) loads.
        spec = InputSpec.from_dict(manifest["input_spec"])
        report = Report.from_dict(manifest["report"])
        pytree.treespec_loads(manifest["output_structure"])
        if not isinstance(manifest["profile"].get("name"), str):
            raise ValueError("profile name missing")
        plan, engines = _load_engines(manifest, entries, directory, path, threads, runtime_cache if path.is_dir() else None)
        return LoadedArtifact(plan, engines, spec, manifest["output_structure"], report, manifest["profile"],
                              tuple(manifest.get("output_none_positions", ())), cleanup)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        cleanup()
        raise _malformed(exc, path) from exc
    except BaseException:
        cleanup()
        raise


@dataclass
class ArtifactDescription:
    """What an artifact says about itself, read from its manifest alone (see `describe`)."""

    digest: str
    manifest: dict
    report: Report


def describe(path: str | Path, expected_digest: str | None = None) -> ArtifactDescription:
    """Open an artifact (zip file or directory) and return its digest, manifest and report
    without extracting or loading any engine, so nothing in it runs: checks the digest (when
    pinned), the format, the schema version and the manifest's shape. Engine files are neither
    read nor checksummed here; `read` (kiln.load) checks them before loading."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ArtifactError("no such file or directory", where=str(path), fix="check the path")
    manifest_bytes = _manifest_bytes(path)
    _check_digest(manifest_bytes, expected_digest, path)
    manifest = read_manifest(manifest_bytes, where=str(path))
    try:
        report = Report.from_dict(manifest["report"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _malformed(exc, path) from exc
    return ArtifactDescription(hashlib.sha256(manifest_bytes).hexdigest(), manifest, report)


def digest(path: str | Path) -> str:
    """The artifact's digest: sha256 of its manifest (which holds every engine file's sha256)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ArtifactError("no such file or directory", where=str(path), fix="check the path")
    return hashlib.sha256(_manifest_bytes(path)).hexdigest()


def _malformed(exc: Exception, path: Path) -> ArtifactError:
    return ArtifactError(f"manifest is malformed ({type(exc).__name__}: {exc})", where=str(path),
                         fix="the artifact is corrupt or was edited; rebuild it")


def _check_digest(manifest_bytes: bytes, expected_digest: str | None, path: Path) -> None:
    if expected_digest is None:
        return
    found = hashlib.sha256(manifest_bytes).hexdigest()
    if found != expected_digest.lower():
        raise ArtifactError(f"artifact digest {found[:16]}... differs from the pinned {expected_digest[:16]}...", where=str(path),
                            fix="the artifact is not the one you pinned; rebuild it or update the pin from a trusted build")


_CORRUPT = "the artifact is truncated or corrupt; rebuild it"


def _manifest_bytes(path: Path) -> bytes:
    """The manifest's bytes, size-capped, from a directory or from a zip whose member names were
    all checked first; nothing else of the artifact is read."""
    if path.is_dir():
        file = path / MANIFEST
        if not file.is_file():
            raise ArtifactError("directory has no manifest.json", where=str(path), fix="pass a directory written by CompiledModel.save")
        if file.stat().st_size > MANIFEST_MAX_BYTES:
            raise ArtifactError(f"manifest.json is {file.stat().st_size} bytes, more than the {MANIFEST_MAX_BYTES >> 20} MiB "
                                "a kiln manifest may be", where=str(path), fix="the artifact was edited; rebuild it")
        return file.read_bytes()
    if not zipfile.is_zipfile(path):
        raise ArtifactError("not a kiln artifact (not a zip archive; truncated or another format)", where=str(path),
                            fix="pass a file written by CompiledModel.save or `kiln compile`")
    try:
        with zipfile.ZipFile(path) as archive:
            seen = set()
            for name in archive.namelist():  # every member's name checked before anything is read
                safe_member(name, where=f"{path} member {name!r}")
                if name in seen:
                    raise ArtifactError(f"archive holds two members named {name!r}", where=str(path),
                                        fix="the artifact was edited; rebuild it from the model")
                seen.add(name)
            if MANIFEST not in seen:
                raise ArtifactError("archive has no manifest.json", where=str(path), fix="the artifact is corrupt; rebuild it")
            info = archive.getinfo(MANIFEST)
            if info.file_size > MANIFEST_MAX_BYTES:
                raise ArtifactError(f"manifest.json declares {info.file_size} bytes, more than the {MANIFEST_MAX_BYTES >> 20} MiB "
                                    "a kiln manifest may be", where=str(path), fix="the artifact was edited; rebuild it")
            buffer = io.BytesIO()
            _copy_capped(archive, info, buffer, path)
            return buffer.getvalue()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArtifactError(f"archive cannot be read ({exc})", where=str(path), fix=_CORRUPT) from exc


def _listed_files(manifest: dict, path: Path) -> dict[str, int]:
    """Every engine file the manifest lists, checked to lie in engines/, with its size."""
    sizes: dict[str, int] = {}
    for engine in manifest["engines"]:
        for item in engine["files"]:
            sizes[engine_member(item["path"], where=f"{path}: manifest engines").as_posix()] = item["size"]
    return sizes


def _extract(path: Path, sizes: dict[str, int], target: Path) -> None:
    """Extract the listed engine files of a zip artifact into `target`. The zip directory is
    checked against the manifest before anything is written (no unlisted member, each declared
    size equal to the manifest's), and each member is streamed with a cap at its manifest size,
    so a zip bomb writes at most what the manifest lists. zipfile checks each CRC as its
    stream ends."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            folders = {str(PurePosixPath(name).parent) + "/" for name in sizes}
            for info in infos:
                if info.filename == MANIFEST or (info.filename in folders and info.file_size == 0):
                    continue
                if info.filename not in sizes:
                    raise ArtifactError(f"artifact holds a file its manifest does not list: {info.filename}", where=str(path),
                                        fix="the artifact was edited; rebuild it from the model")
                if info.file_size != sizes[info.filename]:
                    raise ArtifactError(f"archive member {info.filename} declares {info.file_size} bytes, its manifest lists "
                                        f"{sizes[info.filename]}", where=str(path), fix="the artifact was edited or is corrupt; rebuild it")
            needed = sum(info.file_size for info in infos if info.filename in sizes)
            free = shutil.disk_usage(target).free
            if needed > free:
                raise ArtifactError(f"its engine files need {needed} bytes and the temporary folder has {free} free", where=str(path),
                                    fix="free space there, or point TMPDIR at a larger disk")
            for info in infos:
                if info.filename not in sizes:
                    continue
                file = target / info.filename
                file.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with open(file, "xb") as out:
                        _copy_capped(archive, info, out, path)
                except BaseException:
                    file.unlink(missing_ok=True)
                    raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArtifactError(f"archive cannot be read ({exc})", where=str(path), fix=_CORRUPT) from exc


def _copy_capped(archive: zipfile.ZipFile, info: zipfile.ZipInfo, out, path: Path) -> None:
    """Copy one member to `out`, refusing it once its data runs past its declared size."""
    written = 0
    try:
        with archive.open(info) as stream:
            while block := stream.read(min(1 << 20, info.file_size - written + 1)):
                written += len(block)
                if written > info.file_size:
                    raise ArtifactError(f"archive member {info.filename} holds more data than the {info.file_size} bytes it declares",
                                        where=str(path), fix="the artifact was edited or is corrupt; rebuild it")
                out.write(block)
    except zipfile.BadZipFile as exc:
        raise ArtifactError(f"archive member {info.filename!r} is corrupt ({exc})", where=str(path), fix=_CORRUPT) from exc
    if written != info.file_size:
        raise ArtifactError(f"archive member {info.filename} holds {written} of the {info.file_size} bytes it declares",
                            where=str(path), fix=_CORRUPT)


def _check_versions(manifest: dict, path: Path) -> None:
    versions = manifest["versions"]
    built = str(versions.get("torch", "")).split("+")[0].split(".")[:2]
    here = torch.__version__.split("+")[0].split(".")[:2]
    uses_inductor = any(e.get("backend") == "inductor" for e in manifest["engines"])
    if uses_inductor and built != here:
        raise ArtifactError(f"its Inductor engine was built with torch {versions.get('torch')}, this is torch {torch.__version__}",
                            where=str(path), fix="rebuild the artifact with this torch, or install the torch it names")


def _check_files(manifest: dict, directory: Path, path: Path) -> dict[str, EngineEntry]:
    entries = {}
    for engine in manifest["engines"]:
        names, checksums = [], []
        for item in engine["files"]:
            member = engine_member(item["path"], where=f"{path}: manifest engines")
            file = directory / member
            if not file.is_file():
                raise ArtifactError(f"engine file {item['path']} is missing", where=str(path), fix="the artifact is incomplete; rebuild it")
            if file.stat().st_size != item["size"] or sha256_file(file) != item["sha256"]:
                raise ArtifactError(f"engine file {item['path']} does not match its checksum", where=str(path),
                                    fix="the artifact is corrupt or was tampered with; rebuild it from the model")
            names.append(member.name)
            checksums.append(item["sha256"])
        entries[engine["partition"]] = EngineEntry(engine["backend"], names, engine.get("meta", {}), tuple(checksums))
    return entries


def _import_backends(manifest: dict) -> None:
    """Import the runtimes the engines name, ahead of loading them. Any failure is left for
    _load_engines to report with its own message."""
    try:
        for name in {e.get("backend") for e in manifest["engines"]}:
            registry.get(name).available()
    except Exception:  # noqa: BLE001  (reported where the engine loads)
        pass


def _check_no_unlisted_files(manifest: dict, directory: Path, path: Path) -> None:
    """Only the manifest and its listed engine files may be present: a runtime could pick up
    an unlisted file beside a model (ONNX external weights, say) that no checksum covers."""
    listed = {MANIFEST} | {f["path"] for e in manifest["engines"] for f in e["files"]}
    for file in directory.rglob("*"):
        if file.is_file() and file.relative_to(directory).as_posix() not in listed:
            raise ArtifactError(f"artifact holds a file its manifest does not list: {file.relative_to(directory).as_posix()}",
                                where=str(path), fix="the artifact was edited; rebuild it from the model")


def _load_engines(manifest: dict, entries: dict[str, EngineEntry], directory: Path, path: Path, threads: int | None,
                  runtime_cache: Path | None):
    plan_data = manifest["plan"]
    partitions, engines = [], {}
    for item in plan_data["partitions"]:
        entry = entries.get(item["name"])
        if entry is None or entry.backend != item["backend"]:
            raise ArtifactError(f"partition {item['name']!r} has no matching engine", where=str(path), fix="the artifact is corrupt; rebuild it")
        try:
            backend = registry.get(entry.backend)
        except BackendUnavailable as exc:
            raise ArtifactError(f"needs backend {entry.backend!r}: {exc.what}", where=str(path), fix=exc.fix or "") from None
        status = backend.available()
        if not status.ok:
            raise ArtifactError(f"needs backend {entry.backend!r}, which is unavailable here: {status.reason}", where=str(path),
                                fix=status.install_hint)
        settings = BackendSettings(_runtime_device(item["device"], item.get("device_kind")), threads or usable_cores(), directory / "engines",
                                   runtime_cache=runtime_cache)
        try:
            engines[item["name"]] = backend.load(directory / "engines", entry, settings)
        except KilnError as exc:
            raise ArtifactError(f"engine of partition {item['name']!r} ({entry.backend}) failed to load: {exc.what}", where=str(path),
                                fix=exc.fix or "rebuild the artifact") from exc
        except MemoryError:
            raise
        except Exception as exc:  # whatever a runtime raises on a file it cannot take (assertions, parse errors)
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")[:300]
            raise ArtifactError(f"engine of partition {item['name']!r} ({entry.backend}) failed to load: {type(exc).__name__}: {first}",
                                where=str(path), fix="the engine file is corrupt or needs another version of its runtime; "
                                                     "rebuild the artifact") from exc
        graph = PartitionGraph(item["name"], None, tuple(item["inputs"]), tuple(item["outputs"]), (), None)
        partitions.append(Partition(graph, item["device"], item["backend"], item.get("placed_backend", ""),
                                    item.get("device_kind", "cpu"), item.get("estimated_ms")))
    plan = PartitionPlan(partitions, tuple(plan_data["input_names"]), tuple(plan_data["output_names"]),
                         output_sources=tuple(plan_data.get("output_sources", plan_data["output_names"])))
    _check_plan_wiring(plan, path)
    return plan, engines


def _check_plan_wiring(plan: PartitionPlan, path: Path) -> None:
    """Every partition input and model output must be a model input or an earlier partition's
    output, or running the plan would fail midway with a KeyError."""
    known = set(plan.input_names)
    for partition in plan.partitions:
        missing = [n for n in partition.graph.input_names if n not in known]
        if missing:
            raise ArtifactError(f"partition {partition.name!r} reads {missing[0]!r}, which no earlier partition produces",
                                where=str(path), fix="the artifact is corrupt or was edited; rebuild it")
        known.update(partition.graph.output_names)
    missing = [n for n in plan.sources() if n not in known]
    if missing:
        raise ArtifactError(f"model output {missing[0]!r} is produced by no partition", where=str(path),
                            fix="the artifact is corrupt or was edited; rebuild it")


def _runtime_device(name: str, kind_name: str | None = None) -> DeviceSpec:
    """The local device an engine runs on after loading (only its kind matters to engines)."""
    planned_gpu = kind_name == "gpu" if kind_name is not None else name.startswith("gpu")
    kind = DeviceKind.GPU if torch.cuda.is_available() and planned_gpu else DeviceKind.CPU
    return DeviceSpec(name, kind, "local", 1.0, 1.0, {Precision.FP32: 1.0}, ())
