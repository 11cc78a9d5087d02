"""The artifact manifest: what an artifact holds and what it needs to load, as JSON.

    manifest.json   format, schema_version, versions (kiln, torch, python, each backend),
                    host, profile {name, digest}, input_spec, output_structure, plan,
                    engines [{partition, backend, files [{path, sha256, size}], meta}], report
    engines/...     one or more files per partition's engine (ONNX model, AOTInductor .pt2)

No pickle anywhere: the manifest is JSON and engines are the runtimes' own formats.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path, PurePosixPath

from kiln.errors import ArtifactError

FORMAT = "kiln-artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ENGINE_DIR = "engines"
# The manifest is read into memory whole; a real one is kilobytes (its report included), so a
# larger one is refused from its declared size before any of it is read.
MANIFEST_MAX_BYTES = 64 << 20


def sha256_file(path: Path) -> str:
    """The file's sha256, hashed from a memory map in one call: hashing runs without the GIL,
    and one call takes it back once, where block by block each block would wait out whatever
    Python thread holds it (a runtime importing beside it)."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def safe_member(name: str, where: str) -> PurePosixPath:
    """A manifest or archive path, refused unless it stays inside the artifact."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or not path.parts:
        raise ArtifactError(f"path {name!r} points outside the artifact", where=where,
                            fix="the artifact was tampered with or is corrupt; rebuild it from the model")
    return path


def read_manifest(text: str | bytes, where: str) -> dict:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"manifest is not valid JSON ({exc})", where=where,
                            fix="the artifact is truncated or corrupt; rebuild it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ArtifactError(f"not a kiln artifact (manifest format is {found!r}, expected {FORMAT!r})", where=where,
                            fix="pass a file written by CompiledModel.save or `kiln compile`")
    version = data.get("schema_version")
    if type(version) is not int or version > SCHEMA_VERSION or version < 1:
        raise ArtifactError(f"artifact schema version {version!r} is not supported (this kiln reads 1..{SCHEMA_VERSION})",
                            where=where, fix="load it with the kiln version that wrote it, or rebuild the artifact")
    for key, kind in (("versions", dict), ("profile", dict), ("input_spec", dict), ("output_structure", str),
                      ("plan", dict), ("engines", list), ("report", dict)):
        if not isinstance(data.get(key), kind):
            problem = "lacks" if key not in data else f"has a malformed (not {kind.__name__})"
            raise ArtifactError(f"manifest {problem} {key!r}", where=where, fix="the artifact is corrupt or was edited; rebuild it")
    for engine in data["engines"]:
        files = engine.get("files") if isinstance(engine, dict) else None
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
                and type(f.get("size")) is int for f in files):
            raise ArtifactError("manifest has a malformed engine entry", where=where, fix="the artifact is corrupt or was edited; rebuild it")
    return data


def engine_member(name: str, where: str) -> PurePosixPath:
    """An engine file's path: inside the artifact and directly in engines/, since that is the
    folder backends load from (a file checked elsewhere must not stand in for the one loaded)."""
    path = safe_member(name, where)
    if path.parent != PurePosixPath(ENGINE_DIR):
        raise ArtifactError(f"engine file {name!r} is not in {ENGINE_DIR}/", where=where,
                            fix="the artifact was edited; rebuild it from the model")
    return path
